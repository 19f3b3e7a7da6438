"""OpenAI's completion endpoints: /v1/chat/completions and the legacy /v1/completions.

A request travels: admission (admission.py: key, body, key limits) -> this API's own checks
(validation.py) -> the Router with the alias's fallbacks (routing/router.py) -> a provider -> the
answer in OpenAI's shape (shapes.py), with headers saying who served it -> one usage row (usage/). A
stream is relayed chunk by chunk; one cut short by the client or the backend is still counted, priced
and settled.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from functools import partial
from typing import TYPE_CHECKING, Any

import litellm
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from proxy.server import escalation, validation
from proxy.server.ask_router import ChainFailed, answered, count_whole
from proxy.server.errors import ProxyError
from proxy.server.responses import json_response, sse
from proxy.server.shapes import as_chunks, chat_chunk, chat_dict, has_text, text_chunk, text_dict
from proxy.usage.sources import HEADER as SOURCE_HEADER
from proxy.usage.sources import source_of
from proxy.usage.trace import RequestTrace

if TYPE_CHECKING:
    from proxy.server.app import Proxy

DONE = b"data: [DONE]\n\n"


class Completions:
    def __init__(self, proxy: Proxy) -> None:
        self.proxy = proxy

    async def chat(self, request: Request) -> Response:
        return await self._serve(request, "chat", _chat_prompt, "messages", self.proxy.router.acompletion,
                                 chat_dict, chat_chunk)

    async def text(self, request: Request) -> Response:
        return await self._serve(request, "text", _text_prompt, "prompt", self.proxy.router.atext_completion,
                                 text_dict, text_chunk)

    async def _serve(self, request: Request, endpoint: str, read_prompt: Callable[[dict[str, Any]], Any], field: str,
                     call: Any, to_dict: Any, to_chunk: Any) -> Response:
        p = self.proxy
        caller, body = await p.admission.read(request)
        validation.check_keys(body)
        asked = validation.check_model(body, p.known, p.settings.aliases)
        prompt = read_prompt(body)
        alias = p.admission.resolve(caller, asked, prompt)
        hold = await p.admission.admit(caller, alias, body, body[field])
        trace = p.usage.begin(alias, endpoint, bool(body.get("stream")), caller.key_id, p.recorder.record,
                              source=source_of(request.headers.get(SOURCE_HEADER)))
        trace.hold, trace.requested_model = hold, asked if asked != alias else None
        trace.prompt = prompt
        kwargs = {**self._kwargs(trace, body), field: prompt}
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        return await self._complete(trace, kwargs, include_usage, call, to_dict, to_chunk, body.get("response_format"))

    def _kwargs(self, trace: RequestTrace, body: dict[str, Any]) -> dict[str, Any]:
        metadata = {"delegate_request_id": trace.request_id}
        if body.get("user") is not None:
            metadata["delegate_user"] = body["user"]  # for providers LiteLLM would not hand `user` to
        kwargs = {"model": trace.alias, "metadata": metadata, **validation.forwarded(body)}
        if trace.stream and not escalation.holds_stream(self.proxy, trace):
            kwargs["stream"] = True
            kwargs["stream_options"] = {"include_usage": True}  # real token counts, always
        return kwargs

    async def _complete(self, trace: RequestTrace, kwargs: dict[str, Any], include_usage: bool, call: Any,
                        to_dict: Any, to_chunk: Any, response_format: dict[str, Any] | None) -> Response:
        p = self.proxy
        try:
            result = await escalation.ask_checked(p, trace, call, kwargs, response_format)
        except ChainFailed as failed:
            p.usage.end(trace, "error", failed.cause)
            return failed.error.response(p.served_headers(trace, None, max(failed.groups_tried - 1, 0)))
        _, headers, served_model = answered(p, trace, result)
        headers.update(escalation.verdict_headers(trace))
        if not trace.stream or escalation.holds_stream(p, trace):
            count_whole(trace, result)
            p.usage.end(trace, "success")
            whole = to_dict(result, served_model)
            if not trace.stream:
                return json_response(whole, headers=headers)
            held = b"".join(sse(c) for c in as_chunks(whole, include_usage)) + DONE
            return Response(held, media_type="text/event-stream", headers={**headers, "Cache-Control": "no-cache"})
        body = self._stream(trace, result, include_usage, served_model, to_chunk, response_format)
        return TracedStream(body, partial(self._stream_closed, trace, result, body),
                            media_type="text/event-stream", headers={**headers, "Cache-Control": "no-cache"})

    async def _stream_closed(self, trace: RequestTrace, stream: Any, body: AsyncGenerator[bytes, None]) -> None:
        """However the response ended, its trace is closed now."""
        with contextlib.suppress(Exception):
            await body.aclose()  # a generator left at a yield runs its finally now, not when it is collected
        if trace.status == "pending":  # the generator never ran: the client left before its first chunk
            self.proxy.close_unfinished(trace, ConnectionAbortedError("the client went away before the stream began"))
            await close_backend(stream)

    async def _stream(self, trace: RequestTrace, stream: Any, include_usage: bool, model: str,
                      to_chunk: Any, response_format: dict[str, Any] | None) -> AsyncGenerator[bytes, None]:
        status = "partial"
        error: BaseException | None = None
        answer = Said() if escalation.checks_for(self.proxy, trace.alias) else None
        try:
            async for chunk in stream:
                chunk_usage = getattr(chunk, "usage", None)
                if chunk_usage is not None:
                    trace.prompt_tokens = int(chunk_usage.prompt_tokens or 0)
                    trace.completion_tokens = int(chunk_usage.completion_tokens or 0)
                timings = getattr(chunk, "timings", None)
                if timings:
                    trace.backend_timings = timings
                out = to_chunk(chunk, model)
                if out is None:
                    continue
                if chunk_usage is not None and not out["choices"] and not include_usage:
                    continue
                if answer is not None and out["choices"]:
                    answer.add(out["choices"][0])
                if out["choices"] and has_text(out["choices"][0]):
                    trace.delivered += 1  # about one token: the count that stands when no usage chunk arrives
                    if trace.first_token_at is None:
                        trace.first_token_at = time.perf_counter()
                if not include_usage:
                    out.pop("usage", None)
                yield sse(out)
            status = "success"
        except (asyncio.CancelledError, GeneratorExit):
            error = ConnectionAbortedError("the client disconnected mid-stream")
            raise
        except Exception as exc:  # noqa: BLE001 - whatever the Router raised becomes an OpenAI error
            # the answer died half-way: say so, so no client takes a truncated answer for a whole one
            error = exc
            err = ProxyError(502, f"the backend failed mid-stream: {exc}".split("\n", 1)[0][:500],
                             type_="upstream_error", code="stream_interrupted")
            yield sse(err.body())
        finally:
            trace.finished_at = time.perf_counter()
            if status != "success":
                count_cut_short(trace, model)
            elif answer is not None:
                escalation.judge_stream(self.proxy, trace, "".join(answer.text), answer.tool_calls, answer.finish,
                                        response_format)
            self.proxy.usage.end(trace, status, error)
            await close_backend(stream)
        yield DONE


def _chat_prompt(body: dict[str, Any]) -> Any:
    validation.check_messages(body)
    validation.check_common(body)
    validation.check_tools(body)
    return body["messages"]


def _text_prompt(body: dict[str, Any]) -> Any:
    validation.check_prompt(body)
    validation.check_common(body)
    return body["prompt"][0] if isinstance(body["prompt"], list) else body["prompt"]


class Said:
    """What a stream on a checked alias said, gathered for its checks."""

    def __init__(self) -> None:
        self.text: list[str] = []
        self.tool_calls = 0
        self.finish: str | None = None

    def add(self, choice: dict[str, Any]) -> None:
        delta = choice.get("delta") or {}
        self.text.append(delta.get("content") or choice.get("text") or "")
        self.tool_calls += sum(1 for call in delta.get("tool_calls") or [] if (call.get("function") or {}).get("name"))
        self.finish = choice.get("finish_reason") or self.finish


class TracedStream(StreamingResponse):
    """An SSE response that closes its request's trace however it ends. The generator does so itself once it
    runs; one the client left before asking for the first chunk never runs, and would leave no row and its
    budget hold held for as long as the process lives."""

    def __init__(self, body: AsyncIterator[bytes], on_close: Callable[[], Awaitable[None]], **kwargs: Any) -> None:
        super().__init__(body, **kwargs)
        self._on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self._on_close()


async def close_backend(stream: Any) -> None:
    """Close the backend connection of a stream, which stops its generation."""
    with contextlib.suppress(Exception):
        inner = getattr(stream, "completion_stream", None)
        if inner is not None and hasattr(inner, "aclose"):
            await inner.aclose()


def count_cut_short(trace: RequestTrace, model: str) -> None:
    """A request that ended before its usage came: one token per content chunk sent, the prompt counted here."""
    trace.completion_tokens = max(trace.completion_tokens, trace.delivered)
    if not trace.prompt_tokens:
        trace.prompt_tokens = _estimate_prompt_tokens(trace, model)


def _estimate_prompt_tokens(trace: RequestTrace, model: str) -> int:
    """A stream cut short never got its usage chunk: count the prompt with LiteLLM's tokenizer instead."""
    if trace.prompt is None:
        return 0
    try:
        if isinstance(trace.prompt, str):
            return int(litellm.token_counter(model=model, text=trace.prompt))
        return int(litellm.token_counter(model=model, messages=trace.prompt))
    except Exception:  # noqa: BLE001 - an estimate; zero when even that fails
        return 0


