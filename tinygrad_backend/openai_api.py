"""OpenAI's API on top of the backend: /v1/chat/completions, /v1/completions and /v1/models.

Responses carry the model's real token counts in `usage`, and a `timings` object (llama.cpp server's
name for it) with time to first token, decode speed and device, which the proxy logs.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt, ValidationError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from tinygrad_backend.engine import Finished, Generation, TextDelta
from tinygrad_backend.errors import APIError, from_validation
from tinygrad_backend.sampling import SamplingParams
from tinygrad_backend.service import Backend


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
    seed: StrictInt | None = None
    stop: str | list[str] | None = None
    n: Literal[1] | None = None

    def sampling(self) -> SamplingParams:
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        return SamplingParams(
            max_tokens=self.max_completion_tokens or self.max_tokens,
            temperature=0.8 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            seed=self.seed, stop=stop,
        )


class ChatRequest(_Common):
    messages: list[dict[str, Any]] = Field(min_length=1)
    tools: list[dict[str, Any]] | None = None


class CompletionRequest(_Common):
    prompt: str | list[str] | list[int]


async def _parse(request: Request, model: type[_Common]) -> Any:
    raw = await request.body()
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise APIError(400, f"request body is not valid JSON: {e}") from e
    if not isinstance(body, dict):
        raise APIError(400, "request body must be a JSON object")
    try:
        return model.model_validate(body)
    except ValidationError as e:
        raise from_validation(e) from e


def _usage(done: Finished) -> dict[str, int]:
    return {"prompt_tokens": done.prompt_tokens, "completion_tokens": done.completion_tokens,
            "total_tokens": done.prompt_tokens + done.completion_tokens}


def _finish_reason(done: Finished) -> str:
    if done.reason == "error":
        raise APIError(500, f"generation failed: {done.error}", type_="server_error")
    return "length" if done.reason == "length" else "stop"


def _sse(obj: dict[str, Any]) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


async def _stream(backend: Backend, gen: Generation, base: dict[str, Any], include_usage: bool,
                  chunk: Any) -> AsyncIterator[str]:
    """SSE frames: a chunk per text delta, a final chunk with finish_reason, usage if asked, [DONE]."""
    first = True
    async for event in gen.events():
        if isinstance(event, TextDelta):
            yield _sse({**base, "choices": [chunk(event.text, None, first)]})
            first = False
            continue
        if event.reason == "error":
            yield _sse({"error": {"message": f"generation failed: {event.error}", "type": "server_error",
                                  "param": None, "code": None}})
            yield "data: [DONE]\n\n"
            return
        yield _sse({**base, "choices": [chunk("", _finish_reason(event), first)],
                    "timings": event.timings.as_dict(backend.device)})
        if include_usage:
            yield _sse({**base, "choices": [], "usage": _usage(event)})
        yield "data: [DONE]\n\n"


async def chat_completions(request: Request) -> Response:
    backend: Backend = request.app.state.backend
    req: ChatRequest = await _parse(request, ChatRequest)
    if req.stream_options is not None and not req.stream:
        raise APIError(400, "stream_options is only allowed when stream is true", param="stream_options")
    backend.check_model(req.model)
    gen = backend.submit(backend.chat_prompt(req.messages, req.tools), req.sampling())
    base = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": backend.model_id,
            "system_fingerprint": f"tinygrad-{backend.device}"}
    if req.stream:
        def chunk(text: str, finish: str | None, first: bool) -> dict[str, Any]:
            delta = {"role": "assistant", "content": text} if first else ({"content": text} if text else {})
            return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}

        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        frames = _stream(backend, gen, {**base, "object": "chat.completion.chunk"}, include_usage, chunk)
        return StreamingResponse(frames, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
    text, done = await backend.run_to_end(gen, request.is_disconnected)
    return JSONResponse({
        **base, "object": "chat.completion",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                     "finish_reason": _finish_reason(done)}],
        "usage": _usage(done), "timings": done.timings.as_dict(backend.device),
    })


async def completions(request: Request) -> Response:
    backend: Backend = request.app.state.backend
    req: CompletionRequest = await _parse(request, CompletionRequest)
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
    gen = backend.submit(prompt, req.sampling())
    base = {"id": f"cmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": backend.model_id}
    if req.stream:
        def chunk(text: str, finish: str | None, first: bool) -> dict[str, Any]:
            return {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}

        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        frames = _stream(backend, gen, {**base, "object": "text_completion"}, include_usage, chunk)
        return StreamingResponse(frames, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
    text, done = await backend.run_to_end(gen, request.is_disconnected)
    return JSONResponse({
        **base, "object": "text_completion",
        "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": _finish_reason(done)}],
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
