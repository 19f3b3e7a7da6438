"""Ollama's native API, so Ollama clients and LiteLLM's `ollama_chat/` provider work unchanged.

Only what serves inference or describes the loaded model is here: /api/chat, /api/generate, /api/tags,
/api/ps, /api/show, /api/version. Nothing pulls, creates, copies, pushes or deletes a model.
Durations are nanoseconds and streams are newline-delimited JSON, as Ollama answers
(https://github.com/ollama/ollama/blob/main/docs/api.md).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, StrictInt, ValidationError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from tinygrad_backend.engine import Finished, Generation, TextDelta
from tinygrad_backend.errors import APIError, from_validation
from tinygrad_backend.sampling import SamplingParams
from tinygrad_backend.service import Backend

OLLAMA_VERSION = "0.6.3"  # the API version we follow, as reported to clients that check it


class Options(BaseModel):
    model_config = ConfigDict(extra="allow")  # num_ctx, num_thread, ...: the server's own settings win

    num_predict: StrictInt | None = None
    temperature: float | None = Field(None, ge=0, allow_inf_nan=False)
    top_p: float | None = Field(None, gt=0, le=1, allow_inf_nan=False)
    seed: StrictInt | None = None
    stop: list[str] | None = None

    def sampling(self) -> SamplingParams:
        max_tokens = self.num_predict if self.num_predict is not None and self.num_predict > 0 else None
        return SamplingParams(
            max_tokens=max_tokens, temperature=0.8 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p, seed=self.seed, stop=tuple(self.stop or ()),
        )


class _Common(BaseModel):
    model_config = ConfigDict(extra="allow")  # keep_alive and friends do not apply to a single-model server

    model: str
    stream: bool = True
    options: Options = Field(default_factory=lambda: Options())
    format: Any = None


class ChatRequest(_Common):
    messages: list[dict[str, Any]] = Field(default_factory=list)
    tools: list[dict[str, Any]] | None = None


class GenerateRequest(_Common):
    prompt: str = ""
    system: str | None = None
    raw: bool = False


async def _parse(request: Request, model: type[_Common]) -> Any:
    try:
        body = json.loads(await request.body())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise APIError(400, f"invalid JSON: {e}") from e
    if not isinstance(body, dict):
        raise APIError(400, "request body must be a JSON object")
    try:
        req = model.model_validate(body)
    except ValidationError as e:
        raise from_validation(e) from e
    if req.format:
        raise APIError(400, "structured output ('format') is not supported by this server")
    return req


def _now() -> str:
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")


def _final(backend: Backend, done: Finished) -> dict[str, Any]:
    if done.reason == "error":
        raise APIError(500, f"generation failed: {done.error}")
    t = done.timings
    return {
        "model": backend.model_id, "created_at": _now(), "done": True,
        "done_reason": "length" if done.reason == "length" else "stop",
        "total_duration": int((t.queued_ms + t.prompt_ms + t.predicted_ms) * 1e6), "load_duration": 0,
        "prompt_eval_count": done.prompt_tokens, "prompt_eval_duration": int(t.prompt_ms * 1e6),
        "eval_count": done.completion_tokens, "eval_duration": int(t.predicted_ms * 1e6),
    }


async def _ndjson(backend: Backend, gen: Generation, piece: Any, last: dict[str, Any]) -> AsyncIterator[str]:
    async for event in gen.events():
        if isinstance(event, TextDelta):
            yield json.dumps({"model": backend.model_id, "created_at": _now(), **piece(event.text), "done": False}) + "\n"
        elif event.reason == "error":
            yield json.dumps({"error": f"generation failed: {event.error}"}) + "\n"
        else:
            yield json.dumps({**_final(backend, event), **last}) + "\n"


async def chat(request: Request) -> Response:
    backend: Backend = request.app.state.backend
    req: ChatRequest = await _parse(request, ChatRequest)
    backend.check_model(req.model)
    if not req.messages:  # Ollama answers an empty chat by loading the model
        return JSONResponse({"model": backend.model_id, "created_at": _now(), "message": {"role": "assistant", "content": ""},
                             "done_reason": "load", "done": True})
    gen = backend.submit(backend.chat_prompt(req.messages, req.tools), req.options.sampling())
    if req.stream:
        def piece(text: str) -> dict[str, Any]:
            return {"message": {"role": "assistant", "content": text}}

        lines = _ndjson(backend, gen, piece, {"message": {"role": "assistant", "content": ""}})
        return StreamingResponse(lines, media_type="application/x-ndjson")
    text, done = await backend.run_to_end(gen, request.is_disconnected)
    return JSONResponse({**_final(backend, done), "message": {"role": "assistant", "content": text}})


async def generate(request: Request) -> Response:
    backend: Backend = request.app.state.backend
    req: GenerateRequest = await _parse(request, GenerateRequest)
    backend.check_model(req.model)
    if not req.prompt:
        return JSONResponse({"model": backend.model_id, "created_at": _now(), "response": "", "done_reason": "load",
                             "done": True})
    if req.raw:
        prompt = backend.text_prompt(req.prompt)
    else:
        messages = ([{"role": "system", "content": req.system}] if req.system else []) + [
            {"role": "user", "content": req.prompt}]
        prompt = backend.chat_prompt(messages)
    gen = backend.submit(prompt, req.options.sampling())
    if req.stream:
        return StreamingResponse(_ndjson(backend, gen, lambda text: {"response": text}, {"response": ""}),
                                 media_type="application/x-ndjson")
    text, done = await backend.run_to_end(gen, request.is_disconnected)
    return JSONResponse({**_final(backend, done), "response": text})


def _model_card(backend: Backend) -> dict[str, Any]:
    md = backend.header.metadata
    return {
        "name": f"{backend.model_id}:latest", "model": f"{backend.model_id}:latest",
        "modified_at": datetime.fromtimestamp(backend.header.path.stat().st_mtime, UTC).isoformat(),
        "size": backend.header.path.stat().st_size, "digest": "",
        "details": {"format": "gguf", "family": backend.header.architecture, "families": [backend.header.architecture],
                    "parameter_size": str(md.get("general.size_label", "")),
                    "quantization_level": str(md.get("general.file_type", ""))},
    }


async def tags(request: Request) -> Response:
    return JSONResponse({"models": [_model_card(request.app.state.backend)]})


async def ps(request: Request) -> Response:
    backend: Backend = request.app.state.backend
    loaded = [{**_model_card(backend), "expires_at": "9999-12-31T23:59:59Z", "size_vram": 0,
               "context_length": backend.max_context}] if backend.engine.ready.is_set() else []
    return JSONResponse({"models": loaded})


async def show(request: Request) -> Response:
    backend: Backend = request.app.state.backend
    try:
        body = json.loads(await request.body() or b"{}")
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise APIError(400, f"invalid JSON: {e}") from e
    backend.check_model(str(body.get("model") or body.get("name") or ""))
    arch = backend.header.architecture
    info = {k: v for k, v in backend.header.metadata.items() if not k.startswith("tokenizer.ggml.")}
    info[f"{arch}.context_length"] = backend.max_context
    return JSONResponse({
        "modelfile": "", "parameters": "", "template": backend.template.source,
        "details": _model_card(backend)["details"], "model_info": info, "capabilities": ["completion"],
    })


async def version(request: Request) -> Response:
    return JSONResponse({"version": OLLAMA_VERSION})


routes = [
    Route("/api/chat", chat, methods=["POST"]),
    Route("/api/generate", generate, methods=["POST"]),
    Route("/api/tags", tags, methods=["GET"]),
    Route("/api/ps", ps, methods=["GET"]),
    Route("/api/show", show, methods=["POST"]),
    Route("/api/version", version, methods=["GET"]),
]
