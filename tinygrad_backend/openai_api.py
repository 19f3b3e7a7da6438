"""OpenAI's API on top of the backend: /v1/chat/completions, /v1/completions and /v1/models.

Responses carry the model's real token counts in `usage`, and a `timings` object (llama.cpp server's
name for it) with time to first token, decode speed and device, which the proxy logs.

Beyond OpenAI's own sampling fields the routes take llama.cpp server's (`top_k`, `min_p`, `repeat_penalty`,
`repeat_last_n`); `response_format` (json_object, json_schema) and `tools` are held to their schemas by a
grammar (constraints.py, tool_calls.py). Defaults: OpenAI's where it has one (top_p 1, no penalties),
Ollama's where it has none (top_k 40), and llama.cpp's and Ollama's temperature, 0.8.

A chat body is read, checked and rendered to its prompt by `read_chat`, which /v1/chat/tokenize
(tokenize_api.py) shares, so a count there is the `usage.prompt_tokens` here.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from tinygrad_backend.constraints import Constraint, Grammars
from tinygrad_backend.engine import Finished, Generation, TextDelta, TokenLogprob
from tinygrad_backend.errors import APIError
from tinygrad_backend.request_body import parse
from tinygrad_backend.sampling import MAX_TOP_LOGPROBS, SEED_LIMIT, SamplingParams
from tinygrad_backend.service import MAX_STOP_CHARS, Backend, Stops, logit_bias
from tinygrad_backend.tool_calls import Tools, ToolStream, parse_calls, read_tools


class StreamOptions(BaseModel):
    include_usage: bool = False


class _Common(BaseModel):
    model_config = ConfigDict(extra="allow")  # unknown OpenAI fields (user, logit_bias, ...) are ignored

    model: str | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: StrictInt | None = Field(None, ge=1)
    max_completion_tokens: StrictInt | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2, allow_inf_nan=False)
    top_p: float | None = Field(None, gt=0, le=1, allow_inf_nan=False)
    seed: StrictInt | None = Field(None, ge=0, lt=SEED_LIMIT)
    stop: Annotated[str, Field(max_length=MAX_STOP_CHARS)] | Stops | None = None
    n: Literal[1] | None = None
    top_k: StrictInt | None = Field(None, ge=0)
    min_p: float | None = Field(None, ge=0, le=1, allow_inf_nan=False)
    repeat_penalty: float | None = Field(None, gt=0, le=10, allow_inf_nan=False)
    repeat_last_n: StrictInt | None = Field(None, ge=-1)
    presence_penalty: float | None = Field(None, ge=-2, le=2, allow_inf_nan=False)
    frequency_penalty: float | None = Field(None, ge=-2, le=2, allow_inf_nan=False)
    logit_bias: dict[str, float] | None = None
    response_format: dict[str, Any] | None = None

    def sampling(self, vocab_size: int, logprobs: bool = False, top_logprobs: int = 0) -> SamplingParams:
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        return SamplingParams(
            max_tokens=self.max_completion_tokens or self.max_tokens,
            temperature=0.8 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            seed=self.seed, stop=stop,
            top_k=40 if self.top_k is None else self.top_k,
            min_p=self.min_p or 0.0,
            repeat_penalty=1.0 if self.repeat_penalty is None else self.repeat_penalty,
            repeat_last_n=64 if self.repeat_last_n is None else self.repeat_last_n,
            presence_penalty=self.presence_penalty or 0.0, frequency_penalty=self.frequency_penalty or 0.0,
            logit_bias=logit_bias(self.logit_bias, vocab_size),
            logprobs=logprobs, top_logprobs=top_logprobs,
        )

    def json_format(self) -> tuple[bool, dict[str, Any] | None]:
        """Whether response_format asks for JSON, and the schema it must validate against (None: any object)."""
        fmt = self.response_format
        if fmt is None or fmt.get("type") == "text":
            return False, None
        if fmt.get("type") == "json_object":
            schema = fmt.get("schema")  # llama.cpp server's extension
        elif fmt.get("type") == "json_schema":
            spec = fmt.get("json_schema")
            if not isinstance(spec, dict):
                raise APIError(400, "response_format.json_schema must be an object with a 'schema'",
                               param="response_format")
            schema = spec.get("schema")
        else:
            raise APIError(400, "response_format.type must be 'text', 'json_object' or 'json_schema'",
                           param="response_format")
        if schema is not None and not isinstance(schema, dict):
            raise APIError(400, "the response_format schema must be a JSON object", param="response_format")
        return True, schema


class ChatRequest(_Common):
    messages: list[dict[str, Any]] = Field(min_length=1)
    tools: list[dict[str, Any]] | None = None
    tool_choice: Any = None
    logprobs: bool | None = None
    top_logprobs: StrictInt | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)


class CompletionRequest(_Common):
    prompt: str | list[str] | list[int]
    logprobs: StrictInt | None = Field(None, ge=0, le=5)  # the legacy API's: how many alternatives


def _usage(done: Finished) -> dict[str, int]:
    return {"prompt_tokens": done.prompt_tokens, "completion_tokens": done.completion_tokens,
            "total_tokens": done.prompt_tokens + done.completion_tokens}


def _finish_reason(done: Finished) -> str:
    if done.reason == "error":
        raise APIError(500, f"generation failed: {done.error}", type_="server_error")
    return "length" if done.reason == "length" else "stop"


def _sse(obj: dict[str, Any]) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def _text(token: bytes) -> str:
    return token.decode("utf-8", errors="replace")


def _chat_logprobs(entries: tuple[TokenLogprob, ...] | list[TokenLogprob]) -> dict[str, Any]:
    """OpenAI's chat shape: per token its text, log-probability, UTF-8 bytes and the top alternatives."""
    return {"content": [{"token": _text(e.token), "logprob": e.logprob, "bytes": list(e.token),
                         "top_logprobs": [{"token": _text(t), "logprob": lp, "bytes": list(t)} for t, lp in e.top]}
                        for e in entries], "refusal": None}


class _LegacyLogprobs:
    """The legacy completions shape (tokens, token_logprobs, top_logprobs, text_offset), offsets running on
    across a stream's chunks."""

    def __init__(self) -> None:
        self.offset = 0

    def __call__(self, entries: tuple[TokenLogprob, ...] | list[TokenLogprob]) -> dict[str, Any]:
        offsets = []
        for e in entries:
            offsets.append(self.offset)
            self.offset += len(_text(e.token))
        return {"tokens": [_text(e.token) for e in entries], "token_logprobs": [e.logprob for e in entries],
                "top_logprobs": [{_text(t): lp for t, lp in e.top} for e in entries], "text_offset": offsets}


async def _stream(backend: Backend, gen: Generation, base: dict[str, Any], include_usage: bool, chunk: Any,
                  logprobs: Any = None, tools: ToolStream | None = None) -> AsyncIterator[str]:
    """SSE frames: a chunk per text delta, a final chunk with finish_reason, usage if asked, [DONE]. With `tools`,
    tool call markup is held back and sent as one `tool_calls` delta at the end."""
    first = True
    async for event in gen.events():
        if isinstance(event, TextDelta):
            text = tools.feed(event.text) if tools is not None else event.text
            if text or (logprobs and event.logprobs):
                yield _sse({**base, "choices": [chunk(text, None, first, logprobs(event.logprobs) if logprobs else None)]})
                first = False
            continue
        if event.reason == "error":
            yield _sse({"error": {"message": f"generation failed: {event.error}", "type": "server_error",
                                  "param": None, "code": None}})
            yield "data: [DONE]\n\n"
            return
        finish = _finish_reason(event)
        if tools is not None:
            held, calls = tools.finish()
            if held:
                yield _sse({**base, "choices": [chunk(held, None, first, None)]})
                first = False
            if calls:
                yield _sse({**base, "choices": [chunk("", None, first, None, [c.openai(i) for i, c in enumerate(calls)])]})
                first, finish = False, "tool_calls"
        yield _sse({**base, "choices": [chunk("", finish, first, None)], "timings": event.timings.as_dict(backend.device)})
        if include_usage:
            yield _sse({**base, "choices": [], "usage": _usage(event)})
        yield "data: [DONE]\n\n"


def _constraint(req: _Common, tools: Tools | None) -> tuple[Any, str] | None:
    """What holds the answer to a grammar, and the field it comes from (for a 400), if anything does."""
    wants_json, schema = req.json_format()
    if tools is not None and tools.offered:
        if wants_json:
            raise APIError(400, "response_format cannot be combined with tools unless tool_choice is 'none'",
                           param="response_format")
        return tools.constraint, "tools"

    def json_schema(grammars: Grammars) -> Constraint:
        return grammars.json_schema(schema)

    return (json_schema, "response_format") if wants_json else None


async def _submit(backend: Backend, prompt: list[int], params: SamplingParams, how: tuple[Any, str] | None) -> Generation:
    constraint = await backend.constraint(how[0], how[1]) if how is not None else None
    return backend.submit(prompt, params, constraint)


@dataclass(frozen=True)
class ChatCall:
    """A chat request read and checked, up to its prompt: what /v1/chat/completions generates from and what
    /v1/chat/tokenize (tokenize_api.py) counts, so the two cannot disagree on a body or its prompt."""

    backend: Backend
    req: ChatRequest
    tools: Tools | None
    params: SamplingParams
    prompt: list[int]
    constraint: tuple[Any, str] | None  # what holds the answer to a grammar (not compiled yet), and its field


async def read_chat(request: Request) -> ChatCall:
    """The body checked as a chat completion takes it (the same 400s, in the same order), its prompt rendered by
    the chat template with its tools, and the grammar it would need named, not compiled."""
    backend: Backend = request.app.state.backend
    req: ChatRequest = await parse(request, ChatRequest)
    if req.stream_options is not None and not req.stream:
        raise APIError(400, "stream_options is only allowed when stream is true", param="stream_options")
    if req.top_logprobs and not req.logprobs:
        raise APIError(400, "top_logprobs needs logprobs set to true", param="top_logprobs")
    backend.check_model(req.model)
    tools = read_tools(req.tools, req.tool_choice)
    params = req.sampling(backend.tokenizer.vocab_size, bool(req.logprobs), req.top_logprobs or 0)
    prompt = backend.chat_prompt(req.messages, tools)
    return ChatCall(backend, req, tools, params, prompt, _constraint(req, tools))


async def chat_completions(request: Request) -> Response:
    call = await read_chat(request)
    backend, req, tools = call.backend, call.req, call.tools
    gen = await _submit(backend, call.prompt, call.params, call.constraint)
    offered = tools is not None and tools.offered
    base = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": backend.model_id,
            "system_fingerprint": f"tinygrad-{backend.device}"}
    if req.stream:
        def chunk(text: str, finish: str | None, first: bool, logprobs: Any, calls: Any = None) -> dict[str, Any]:
            delta: dict[str, Any] = {"role": "assistant", "content": text} if first else ({"content": text} if text else {})
            if calls:
                delta = {**delta, "content": None, "tool_calls": calls} if first else {"tool_calls": calls}
            return {"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish}

        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        frames = _stream(backend, gen, {**base, "object": "chat.completion.chunk"}, include_usage, chunk,
                         _chat_logprobs if req.logprobs else None, ToolStream() if offered else None)
        return StreamingResponse(frames, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
    entries: list[TokenLogprob] = []
    text, done = await backend.run_to_end(gen, request.is_disconnected, entries)
    finish = _finish_reason(done)
    message: dict[str, Any] = {"role": "assistant", "content": text}
    if offered:
        content, calls = parse_calls(text)
        if calls:
            message = {"role": "assistant", "content": content or None, "tool_calls": [c.openai() for c in calls]}
            finish = "tool_calls"
        else:
            message["content"] = content
    return JSONResponse({
        **base, "object": "chat.completion",
        "choices": [{"index": 0, "message": message, "logprobs": _chat_logprobs(entries) if req.logprobs else None,
                     "finish_reason": finish}],
        "usage": _usage(done), "timings": done.timings.as_dict(backend.device),
    })


async def completions(request: Request) -> Response:
    backend: Backend = request.app.state.backend
    req: CompletionRequest = await parse(request, CompletionRequest)
    if req.stream_options is not None and not req.stream:
        raise APIError(400, "stream_options is only allowed when stream is true", param="stream_options")
    backend.check_model(req.model)
    if isinstance(req.prompt, str):
        prompt = backend.text_prompt(req.prompt)
    elif all(isinstance(p, int) for p in req.prompt):
        prompt = list(req.prompt)  # type: ignore[arg-type]
        if any(not 0 <= p < backend.tokenizer.vocab_size for p in prompt):
            raise APIError(400, "prompt token ids must lie inside the vocabulary", param="prompt")
    elif len(req.prompt) == 1:
        prompt = backend.text_prompt(str(req.prompt[0]))
    else:
        raise APIError(400, "one prompt per request is supported", param="prompt")
    if not prompt:
        raise APIError(400, "prompt must not be empty", param="prompt")
    wants_logprobs = req.logprobs is not None
    params = req.sampling(backend.tokenizer.vocab_size, wants_logprobs, req.logprobs or 0)
    gen = await _submit(backend, prompt, params, _constraint(req, None))
    base = {"id": f"cmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": backend.model_id}
    legacy = _LegacyLogprobs() if wants_logprobs else None
    if req.stream:
        def chunk(text: str, finish: str | None, first: bool, logprobs: Any, calls: Any = None) -> dict[str, Any]:
            return {"index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish}

        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        frames = _stream(backend, gen, {**base, "object": "text_completion"}, include_usage, chunk, legacy)
        return StreamingResponse(frames, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
    entries: list[TokenLogprob] = []
    text, done = await backend.run_to_end(gen, request.is_disconnected, entries)
    return JSONResponse({
        **base, "object": "text_completion",
        "choices": [{"index": 0, "text": text, "logprobs": legacy(entries) if legacy else None,
                     "finish_reason": _finish_reason(done)}],
        "usage": _usage(done), "timings": done.timings.as_dict(backend.device),
    })


async def models(request: Request) -> Response:
    backend: Backend = request.app.state.backend
    return JSONResponse({"object": "list", "data": [{
        "id": backend.model_id, "object": "model", "created": backend.created, "owned_by": "tinygrad_backend",
        "meta": {"context_length": backend.max_context, "device": backend.device,
                 "architecture": backend.header.architecture, "name": backend.header.name},
    }]})


routes = [
    Route("/v1/chat/completions", chat_completions, methods=["POST"]),
    Route("/v1/completions", completions, methods=["POST"]),
    Route("/v1/models", models, methods=["GET"]),
]
