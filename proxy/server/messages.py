"""Anthropic's Messages API: POST /v1/messages, POST /v1/messages/count_tokens, and the model list Claude Code
reads (GET /v1/models with an `anthropic-version` header).

A request travels: admission (admission.py: the key, from `x-api-key` or `Authorization: Bearer`; the body;
the key's limits) -> this API's checks (anthropic_protocol.py) -> where its model goes (model_tiers.py):

- a local alias (a tier such as `claude-haiku-*` -> `quick`, or an alias by name): LiteLLM's Anthropic ->
  OpenAI adapter, the Router with the alias's fallbacks (`Router.acompletion`, as the OpenAI endpoints do), and
  the answer back through the same adapter, streamed as Anthropic's events; headers say who served.
- Anthropic (a Claude model no tier maps): passthrough.py relays the body and the stream's bytes unchanged.
- a tier whose local chain cannot answer (every local deployment down or cooling down, the request longer than
  any local context, or something the local models cannot take: anthropic_protocol.py's rules) goes to the
  Claude model it asked for by passthrough, when a key is available, recorded as a fallback.

count_tokens goes where the same request would: to Anthropic, or to the local deployment that would serve it,
which counts it with its own tokenizer and template (token_count.py), or an error saying why it cannot; never a
guessed number. A local stream's message_start carries that count too, asked as the request goes to the Router.

Every request is one usage row (usage/); a passthrough row carries Anthropic's own usage (input, output, cache
creation, cache read), priced from LiteLLM's table. Every error is in Anthropic's shape.

Why not `Router.aanthropic_messages`: with LiteLLM 1.110.2 it serves a CustomLLM provider and follows the
fallbacks for a whole answer, but its streaming path imports LiteLLM's proxy server (FastAPI), which is not
installed here; the same adapter it uses is called directly instead, around the Router's `acompletion`.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from functools import partial
from typing import TYPE_CHECKING, Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Message

from proxy.routing.auto import AUTO
from proxy.server import anthropic_protocol as protocol
from proxy.server import escalation
from proxy.server.anthropic_models import AnthropicModels
from proxy.server.ask_router import ChainFailed, answered, count_whole
from proxy.server.auth import Caller, bearer
from proxy.server.completions import TracedStream, close_backend, count_cut_short
from proxy.server.errors import ProxyError
from proxy.server.model_tiers import Cloud, Local, ModelTiers, is_claude
from proxy.server.passthrough import OwnKey, Passthrough, UsageTap, read_usage, relay, returned_headers
from proxy.server.responses import json_response
from proxy.server.token_count import Count, TokenCounter
from proxy.usage.trace import CloudUsage, RequestTrace

if TYPE_CHECKING:
    from proxy.server.app import Proxy

# what a failed local chain answered that a Claude model can take instead: nothing local could be reached or
# all of it is cooling down, or the request is longer than every local context
FALLBACK_CODES = ("backends_unreachable", "deployments_cooling_down", "context_length_exceeded")
ANTHROPIC_KEY_PREFIX = "sk-ant-"
# how long a local stream's message_start waits for its prompt's count (asked of the backend the chain would reach
# as the request goes to the Router, so it is there before the first token); past this it says 0, and message_delta
# carries the backend's own count
PRECOUNT_WAIT_S = 2.0


class Signed:
    """A request read for this API: `x-api-key` stands in for `Authorization: Bearer` when that is absent (the
    Delegate key is whichever of the two the caller signed in with), and the body's bytes are kept as they came,
    for a passthrough to send unchanged."""

    def __init__(self, request: Request) -> None:
        headers = request.scope["headers"]
        self.key = request.headers.get("x-api-key")
        self.token = bearer(request.headers.get("authorization"))
        self.signed_with = self.token or self.key
        scope = dict(request.scope)
        if self.key is not None and not any(k == b"authorization" for k, _ in headers):
            scope["headers"] = [*headers, (b"authorization", b"Bearer " + self.key.encode("latin-1"))]
        self.chunks: list[bytes] = []
        self.request = Request(scope, self._receive(request))

    def _receive(self, request: Request) -> Any:
        async def receive() -> Message:
            message = await request.receive()
            if message["type"] == "http.request":
                self.chunks.append(message.get("body", b""))
            return message
        return receive

    @property
    def raw(self) -> bytes:
        return b"".join(self.chunks)

    @property
    def target(self) -> str:
        """The path and query as the client sent them (Claude Code adds `?beta=true`), for Anthropic."""
        url = self.request.url
        return url.path + (f"?{url.query}" if url.query else "")

    def own_key(self, caller: Caller, proxy: Proxy) -> OwnKey | None:
        """The caller's own Anthropic key, and the header it came in (`x-api-key`, or `authorization` as the
        anthropic SDK sends its api_key): an Anthropic key (`sk-ant-...`) that is not the Delegate key the caller
        signed in with. Nothing else a caller sends is ever forwarded to the cloud."""
        delegate_key = caller.master or caller.issued is not None
        for header, value in (("x-api-key", self.key), ("authorization", self.token)):
            if not value or not value.startswith(ANTHROPIC_KEY_PREFIX) or proxy.auth.is_master(value):
                continue
            if value == self.signed_with and delegate_key:
                continue
            return OwnKey(header, value)
        return None


def in_anthropics_shape(handler: Callable[[Any, Signed], Awaitable[Response]]) -> Callable[[Any, Request], Awaitable[Response]]:
    """A route of this API: its request signed for the relay, and a refusal answered in Anthropic's error shape."""
    @functools.wraps(handler)
    async def route(self: Any, request: Request) -> Response:
        try:
            return await handler(self, Signed(request))
        except ProxyError as e:
            return protocol.error_response(e)
    return route


class Messages:
    def __init__(self, proxy: Proxy) -> None:
        self.proxy = proxy
        self.tiers = ModelTiers(proxy.settings)
        self.passthrough = Passthrough(proxy.settings.delegate.anthropic)
        self.counter = TokenCounter(proxy, self.passthrough.client)  # one pooled client for every upstream
        self.models = AnthropicModels(proxy, self.tiers)  # GET /v1/models with anthropic-version

    async def aclose(self) -> None:
        await self.passthrough.aclose()

    # --- POST /v1/messages ---------------------------------------------------------------------------

    @in_anthropics_shape
    async def create(self, signed: Signed) -> Response:
        p = self.proxy
        caller, body = await p.admission.read(signed.request)
        model = protocol.check_model(body)
        route = self._route(model, caller, body)
        own_key = signed.own_key(caller, p)
        if isinstance(route, Cloud):  # as it came: Anthropic checks the rest of the body
            self.passthrough.upstream(signed.request.headers, own_key, model)  # no key: refused before the hold
            hold = await p.admission.admit(caller, model, body, _prompt(body))
            trace = self._begin(model, body, caller)
            trace.hold = hold
            return await self._pass(signed, own_key, trace, model, fallback=False)
        protocol.check_request(body)
        protocol.check_generation(body)
        refusal = self._refusal(route, body, own_key)
        hold = await p.admission.admit(caller, route.alias, body, _prompt(body))
        trace = self._begin(route.alias, body, caller)
        trace.hold = hold
        if refusal is not None:
            assert route.claude is not None
            return await self._pass(signed, own_key, trace, route.claude, fallback=True)
        return await self._local(signed, own_key, trace, route, body)

    def _route(self, model: str, caller: Caller, body: dict[str, Any]) -> Local | Cloud:
        if model == AUTO and self.proxy.auto.aliases:  # the alias chosen from the request itself (routing/auto.py)
            protocol.check_messages(body)
            return Local(self.proxy.admission.resolve(caller, AUTO, _auto_prompt(body)))
        route = self.tiers.route(model)
        if route is None:
            known = ", ".join(sorted(self.tiers.groups))
            hint = " (passthrough to Anthropic is off: delegate.anthropic.passthrough)" if is_claude(model) else ""
            raise ProxyError(404, f"model: {model!r} is not a model here{hint}; use a Claude model or one of: {known}",
                             type_="not_found_error")
        return route

    def _refusal(self, route: Local, body: dict[str, Any], own_key: OwnKey | None) -> str | None:
        """Why no local model can take this request, when the Claude model asked for can (a 400 when it cannot)."""
        refusal = protocol.local_refusal(body)
        if refusal is not None and not (route.claude and self.passthrough.available(own_key)):
            raise protocol.invalid(f"{refusal}, and '{route.alias}' is served locally"
                                   + (": send an Anthropic key to have it go to Claude" if route.claude else ""))
        return refusal

    def _begin(self, alias: str, body: dict[str, Any], caller: Caller) -> RequestTrace:
        p = self.proxy
        trace = p.usage.begin(alias, "messages", bool(body.get("stream")), caller.key_id, p.recorder.record,
                              source="messages")
        trace.requested_model = body["model"]
        return trace

    # --- served here ---------------------------------------------------------------------------------

    async def _local(self, signed: Signed, own_key: OwnKey | None, trace: RequestTrace, route: Local,
                     body: dict[str, Any]) -> Response:
        p = self.proxy
        kwargs, mapping = protocol.to_openai(body, None)
        trace.prompt = kwargs.get("messages")
        metadata: dict[str, Any] = {"delegate_request_id": trace.request_id}
        if kwargs.get("user") is not None:
            metadata["delegate_user"] = kwargs["user"]  # metadata.user_id, for providers LiteLLM would not hand it to
        kwargs = {**kwargs, "model": route.alias, "metadata": metadata}
        precount = None
        held = escalation.holds_stream(p, trace)  # answered whole and checked before anything is sent
        if trace.stream and not held:
            kwargs.update(stream=True, stream_options={"include_usage": True})
            precount = self._precount(route.alias, kwargs)
        try:
            result = await escalation.ask_checked(p, trace, p.router.acompletion, kwargs, None)
        except ChainFailed as failed:
            if precount is not None:
                precount.cancel()
            if route.claude and failed.error.code in FALLBACK_CODES and self.passthrough.available(own_key):
                return await self._pass(signed, own_key, trace, route.claude, fallback=True, hops=failed.groups_tried)
            p.usage.end(trace, "error", failed.cause)
            return protocol.error_response(failed.error, p.served_headers(trace, None, max(failed.groups_tried - 1, 0)))
        _, headers, served_model = answered(p, trace, result)
        headers.update(escalation.verdict_headers(trace))
        if not trace.stream or held:
            count_whole(trace, result)
            message = protocol.to_message(result, served_model, mapping)
            p.usage.end(trace, "success")
            if held:
                return Response(protocol.message_events(message), media_type="text/event-stream",
                                headers={**headers, "Cache-Control": "no-cache"})
            return json_response(message, headers=headers)
        events = self._events(trace, result, served_model, mapping, precount)
        return TracedStream(events, partial(self._stream_closed, trace, result, events),
                            media_type="text/event-stream", headers={**headers, "Cache-Control": "no-cache"})

    def _precount(self, alias: str, kwargs: dict[str, Any]) -> asyncio.Future[Count] | None:
        """A stream's prompt counted while the Router gets it answered (token_count.py), for message_start: one
        tokenize request a stream to the tinygrad backend the chain would reach, while that backend reads the
        prompt. Measured here (bundled model, 455-token prompt, 20 interleaved streams each way): the count took
        7 ms p50 and was there long before the first token (~2.4 s); time to first token 2378 ms p50 with it, 2420
        without, within the noise. Asked only once the stream had begun, it waited on the decoding backend (0.2-0.3
        s more to message_start, in a smaller run). None where the chain has no tinygrad deployment."""
        p = self.proxy
        if not any(p.deployments[i].provider == "tinygrad" for i in p.chain_ids.get(alias, [])):
            return None
        precount = asyncio.ensure_future(self.counter.count(alias, kwargs))
        precount.add_done_callback(_retrieved)
        return precount

    async def _precounted(self, trace: RequestTrace, precount: asyncio.Future[Count] | None) -> int:
        if precount is None:
            return 0
        try:
            async with asyncio.timeout(PRECOUNT_WAIT_S):
                count = await precount
        except Exception:  # noqa: BLE001 - any failure only means message_start cannot say it; message_delta will
            return 0
        served = self.proxy.deployments.get(trace.served_by or "")
        return count.tokens if served is not None and served.model == count.deployment.model else 0

    async def _stream_closed(self, trace: RequestTrace, stream: Any, body: AsyncGenerator[bytes, None]) -> None:
        with contextlib.suppress(Exception):
            await body.aclose()
        if trace.status == "pending":  # the client left before the first event
            self.proxy.close_unfinished(trace, ConnectionAbortedError("the client went away before the stream began"))
            await close_backend(stream)

    async def _tap(self, trace: RequestTrace, stream: Any) -> AsyncIterator[Any]:
        """The Router's chunks on their way into the adapter: the real token counts and the backend's timings."""
        async for chunk in stream:
            usage = getattr(chunk, "usage", None)
            if usage is not None:
                trace.prompt_tokens = int(getattr(usage, "prompt_tokens", 0) or 0)
                trace.completion_tokens = int(getattr(usage, "completion_tokens", 0) or 0)
            timings = getattr(chunk, "timings", None)
            if timings:
                trace.backend_timings = timings
            yield chunk

    async def _events(self, trace: RequestTrace, stream: Any, model: str, mapping: dict[str, str],
                      precount: asyncio.Future[Count] | None = None) -> AsyncGenerator[bytes, None]:
        """Anthropic's event sequence from an OpenAI-shaped stream, by LiteLLM's adapter: message_start,
        content_block_start, ping, content_block_delta (text_delta / input_json_delta), content_block_stop,
        message_delta (stop_reason, usage), message_stop.

        The backend's stream says how long the prompt was only at its end, so message_start's input_tokens is
        `precount` (_precount) when the deployment that counted it is the one that serves the stream (or another
        of the same model), and 0 when there is none, it failed, or it is not there within PRECOUNT_WAIT_S;
        message_delta carries the backend's own count, with the output tokens."""
        from litellm.llms.anthropic.messages.adapters.streaming_iterator import AnthropicStreamWrapper

        status = "partial"
        error: BaseException | None = None
        pinged = False
        precounted = 0
        said: list[str] = []  # the text, for a checked alias's verdict once the stream is sent
        tool_calls, stop_reason = 0, None
        try:
            async for data in AnthropicStreamWrapper(completion_stream=self._tap(trace, stream),  # type: ignore[arg-type]
                                                     model=model,
                                                     tool_name_mapping=mapping):
                if not isinstance(data, dict):
                    continue
                kind = data.get("type")
                if kind == "message_start":
                    precounted = await self._precounted(trace, precount)
                    data["message"]["id"] = protocol.message_id()
                    data["message"]["usage"] = protocol.usage_dict(precounted, 0)
                elif kind == "content_block_start":
                    tool_calls += (data.get("content_block") or {}).get("type") == "tool_use"
                elif kind == "content_block_delta":
                    said.append((data.get("delta") or {}).get("text") or "")
                    trace.delivered += 1
                    if trace.first_token_at is None:
                        trace.first_token_at = time.perf_counter()
                elif kind == "message_delta":
                    data["delta"] = {"stop_sequence": None, **(data.get("delta") or {})}
                    stop_reason = data["delta"].get("stop_reason")
                    usage = {**protocol.usage_dict(0, 0), **(data.get("usage") or {})}
                    # the adapter's counts (from the backend's usage chunk), else the tap's, else the precount
                    usage["input_tokens"] = usage["input_tokens"] or trace.prompt_tokens or precounted
                    usage["output_tokens"] = usage["output_tokens"] or trace.completion_tokens
                    data["usage"] = usage
                if kind == "message_delta" and not pinged:  # an answer with no block still gets its ping
                    yield protocol.PING
                    pinged = True
                yield protocol.event(data)
                if kind == "content_block_start" and not pinged:
                    yield protocol.PING
                    pinged = True
            status = "success"
        except (asyncio.CancelledError, GeneratorExit):
            error = ConnectionAbortedError("the client disconnected mid-stream")
            raise
        except Exception as exc:  # noqa: BLE001 - the answer died half-way: say so in Anthropic's error event
            error = exc
            yield protocol.stream_error(502, f"the backend failed mid-stream: {exc}".split("\n", 1)[0][:500])
        finally:
            if precount is not None:
                precount.cancel()
            trace.finished_at = time.perf_counter()
            if status != "success":
                count_cut_short(trace, model)
            else:
                escalation.judge_stream(self.proxy, trace, "".join(said), tool_calls,
                                        "length" if stop_reason == "max_tokens" else stop_reason, None)
            self.proxy.usage.end(trace, status, error)
            await close_backend(stream)

    # --- passed through to Anthropic -------------------------------------------------------------------

    async def _pass(self, signed: Signed, own_key: OwnKey | None, trace: RequestTrace, model: str, fallback: bool,
                    hops: int = 0) -> Response:
        p = self.proxy
        headers = {**p.served_headers(trace, None, hops), "x-delegate-served-by": f"anthropic/{model}"}
        trace.cloud = CloudUsage(model, fallback=fallback)
        try:
            upstream = self.passthrough.upstream(signed.request.headers, own_key, model)
            response = await self.passthrough.send(signed.target, signed.raw, upstream)
        except ProxyError as e:
            p.usage.end(trace, "error", e)
            return protocol.error_response(e, headers)
        headers = {**returned_headers(response.headers), **headers}
        if response.status_code == 200 and response.headers.get("content-type", "").startswith("text/event-stream"):
            tap = UsageTap(trace.cloud)
            body = self._relay(trace, response, tap)
            return TracedStream(body, partial(self._relay_closed, trace, response, body), status_code=200,
                                headers={**headers, "Cache-Control": "no-cache"})
        try:
            data = await response.aread()
        finally:
            await response.aclose()
        trace.first_token_at = trace.finished_at = time.perf_counter()
        if response.status_code == 200:
            with contextlib.suppress(ValueError, AttributeError):
                read_usage(json.loads(data).get("usage"), trace.cloud)
            self._cloud_tokens(trace)
            p.usage.end(trace, "success")
        else:
            p.usage.end(trace, "error", _upstream_error(response.status_code, data))
        return Response(data, status_code=response.status_code, headers=headers)

    @staticmethod
    def _cloud_tokens(trace: RequestTrace) -> None:
        usage = trace.cloud
        assert usage is not None
        trace.prompt_tokens = usage.input_tokens + usage.cache_creation_tokens + usage.cache_read_tokens
        trace.completion_tokens = usage.output_tokens

    async def _relay(self, trace: RequestTrace, response: Any, tap: UsageTap) -> AsyncGenerator[bytes, None]:
        status = "partial"
        error: BaseException | None = None
        try:
            async for chunk in relay(response, tap, trace):
                yield chunk
            status = "success" if tap.error is None else "error"
            error = RuntimeError(tap.error) if tap.error else None
        except (asyncio.CancelledError, GeneratorExit):
            error = ConnectionAbortedError("the client disconnected mid-stream")
            raise
        except Exception as exc:  # noqa: BLE001 - Anthropic's connection broke: the client's SDK sees the cut
            error = exc
            yield protocol.stream_error(502, f"the connection to Anthropic broke mid-stream: {type(exc).__name__}")
        finally:
            trace.finished_at = time.perf_counter()
            trace.delivered = tap.text_events
            self._cloud_tokens(trace)
            if status == "partial":
                trace.completion_tokens = max(trace.completion_tokens, trace.delivered)
            self.proxy.usage.end(trace, status, error)

    async def _relay_closed(self, trace: RequestTrace, response: Any, body: AsyncGenerator[bytes, None]) -> None:
        with contextlib.suppress(Exception):
            await body.aclose()
        with contextlib.suppress(Exception):
            await response.aclose()
        if trace.status == "pending":
            self.proxy.close_unfinished(trace, ConnectionAbortedError("the client went away before the stream began"))

    # --- POST /v1/messages/count_tokens ----------------------------------------------------------------

    @in_anthropics_shape
    async def count_tokens(self, signed: Signed) -> Response:
        """Anthropic counts for a Claude model; for a model served here, the deployment that would serve the
        request counts it with its own tokenizer and chat template (token_count.py), or the answer is an error
        saying why it cannot, never a guess (a count of 0 would make Claude Code believe its context empty and
        never compact it). What /v1/messages would send to the Claude model asked for (nothing local can answer
        now, the prompt is longer than every local context, or it carries what no local model reads) Anthropic
        counts, when a key is available."""
        p = self.proxy
        caller, body = await p.admission.read(signed.request)
        model = protocol.check_model(body)
        route = self._route(model, caller, body)
        own_key = signed.own_key(caller, p)
        if isinstance(route, Cloud):
            return await self._anthropic_count(signed, own_key, model)
        protocol.check_request(body)
        p.admission.check_alias(caller, route.alias)
        to_claude = route.claude is not None and self.passthrough.available(own_key)
        if self._refusal(route, body, own_key) is not None:
            return await self._anthropic_count(signed, own_key, model)
        try:
            count = await self.counter.count(route.alias, protocol.to_openai(body, None)[0])
        except ProxyError as e:
            if to_claude and e.code in FALLBACK_CODES:
                return await self._anthropic_count(signed, own_key, model)
            raise
        if not count.fits and to_claude:
            return await self._anthropic_count(signed, own_key, model)
        return json_response({"input_tokens": count.tokens},
                             headers={"x-delegate-alias": route.alias, "x-delegate-served-by": count.deployment.model})

    async def _anthropic_count(self, signed: Signed, own_key: OwnKey | None, model: str) -> Response:
        upstream = self.passthrough.upstream(signed.request.headers, own_key, model)
        response = await self.passthrough.send(signed.target, signed.raw, upstream)
        try:
            data = await response.aread()
        finally:
            await response.aclose()
        return Response(data, status_code=response.status_code, headers=returned_headers(response.headers))


def _auto_prompt(body: dict[str, Any]) -> list[dict[str, Any]]:
    """What `auto` reads of a Messages API request: its system prompt (a string or blocks) and its messages."""
    system = body.get("system")
    return [*([{"role": "system", "content": system}] if system else []), *body["messages"]]


def _prompt(body: dict[str, Any]) -> Any:
    """What admission sizes a budget hold by: the system prompt and the messages."""
    return [body.get("system"), body.get("messages")]


def _upstream_error(status: int, data: bytes) -> Exception:
    try:
        message = json.loads(data)["error"]["message"]
    except (ValueError, KeyError, TypeError):
        message = data[:200].decode(errors="replace")
    return RuntimeError(f"Anthropic answered {status}: {message}"[:500])


def _retrieved(task: asyncio.Future[Any]) -> None:
    """A background task's failure, taken so that asyncio does not log it: its reader decides what it means."""
    if not task.cancelled():
        task.exception()
