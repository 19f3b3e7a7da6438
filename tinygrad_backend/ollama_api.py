"""Ollama's native API, so Ollama clients and LiteLLM's `ollama_chat/` provider work unchanged.

Only what serves inference or describes the loaded model is here: /api/chat, /api/generate, /api/tags,
/api/ps, /api/show, /api/version. Nothing pulls, creates, copies, pushes or deletes a model.
Durations are nanoseconds and streams are newline-delimited JSON, as Ollama answers
(https://github.com/ollama/ollama/blob/main/docs/api.md).

`options` map to the same sampler the OpenAI routes use, with Ollama's defaults (top_k 40, top_p 0.9,
repeat_penalty 1.1 over the last 64 tokens, temperature 0.8); `format` ("json" or a JSON schema) is held to by a
grammar (constraints.py), and `tools` come back as `message.tool_calls` (tool_calls.py; Ollama has no
tool_choice: the model chooses).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, Field, StrictInt
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from tinygrad_backend.constraints import Constraint, Grammars
from tinygrad_backend.engine import Finished, Generation, TextDelta
from tinygrad_backend.errors import APIError
from tinygrad_backend.request_body import json_object, parse
from tinygrad_backend.sampling import SEED_LIMIT, SamplingParams
from tinygrad_backend.service import Backend, Stops
from tinygrad_backend.tool_calls import Tools, ToolStream, parse_calls, read_tools

OLLAMA_VERSION = "0.6.3"  # the API version we follow, as reported to clients that check it


class Options(BaseModel):
    model_config = ConfigDict(extra="allow")  # num_ctx, num_thread, ...: the server's own settings win

    num_predict: StrictInt | None = Field(None, ge=-2)  # -1: until the end, -2: until the context is full
    temperature: float | None = Field(None, ge=0, le=2, allow_inf_nan=False)
    top_p: float | None = Field(None, gt=0, le=1, allow_inf_nan=False)
    seed: StrictInt | None = Field(None, ge=0, lt=SEED_LIMIT)
    stop: Stops | None = None
    top_k: StrictInt | None = Field(None, ge=0)
    min_p: float | None = Field(None, ge=0, le=1, allow_inf_nan=False)
    repeat_penalty: float | None = Field(None, gt=0, le=10, allow_inf_nan=False)
    repeat_last_n: StrictInt | None = Field(None, ge=-1)
    presence_penalty: float | None = Field(None, ge=-2, le=2, allow_inf_nan=False)
    frequency_penalty: float | None = Field(None, ge=-2, le=2, allow_inf_nan=False)
    num_ctx: StrictInt | None = Field(None, ge=1)

    def sampling(self, max_context: int) -> SamplingParams:
        if self.num_ctx is not None and self.num_ctx > max_context:
            raise APIError(400, f"options.num_ctx {self.num_ctx} is more than this server's context of {max_context} "
                           "tokens (its --max-context)")
        max_tokens = self.num_predict if self.num_predict is not None and self.num_predict > 0 else None
        return SamplingParams(
            max_tokens=max_tokens, temperature=0.8 if self.temperature is None else self.temperature,
            top_p=0.9 if self.top_p is None else self.top_p, seed=self.seed, stop=tuple(self.stop or ()),
            top_k=40 if self.top_k is None else self.top_k, min_p=self.min_p or 0.0,
            repeat_penalty=1.1 if self.repeat_penalty is None else self.repeat_penalty,
            repeat_last_n=64 if self.repeat_last_n is None else self.repeat_last_n,
            presence_penalty=self.presence_penalty or 0.0, frequency_penalty=self.frequency_penalty or 0.0,
        )


class _Common(BaseModel):
    model_config = ConfigDict(extra="allow")  # keep_alive and friends do not apply to a single-model server

    model: str
    stream: bool = True
    options: Options = Field(default_factory=lambda: Options())
    format: Any = None


Request_ = TypeVar("Request_", bound=_Common)


class ChatRequest(_Common):
    messages: list[dict[str, Any]] = Field(default_factory=list)
    tools: list[dict[str, Any]] | None = None


class GenerateRequest(_Common):
    prompt: str = ""
    system: str | None = None
    raw: bool = False


async def _parse(request: Request, shape: type[Request_]) -> Request_:
    req = await parse(request, shape)
    if req.format not in (None, "", "json") and not isinstance(req.format, dict):
        raise APIError(400, "format must be \"json\" or a JSON schema object")
    return req


async def _submit(backend: Backend, req: _Common, prompt: list[int], tools: Tools | None = None) -> Generation:
    params = req.options.sampling(backend.max_context)
    constraint = None
    if tools is not None and tools.offered:
        if req.format:
            raise APIError(400, "format cannot be combined with tools")
        constraint = await backend.constraint(tools.constraint, "tools")
    elif req.format:
        schema = req.format if isinstance(req.format, dict) else None

        def json_schema(grammars: Grammars) -> Constraint:
            return grammars.json_schema(schema)

        constraint = await backend.constraint(json_schema, "format")
    return backend.submit(prompt, params, constraint)


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


async def _ndjson(backend: Backend, gen: Generation, piece: Any, last: dict[str, Any],
                  tools: ToolStream | None = None) -> AsyncIterator[str]:
    def line(body: dict[str, Any]) -> str:
        return json.dumps({"model": backend.model_id, "created_at": _now(), **body, "done": False}) + "\n"

    async for event in gen.events():
        if isinstance(event, TextDelta):
            text = tools.feed(event.text) if tools is not None else event.text
            if text:
                yield line(piece(text))
        elif event.reason == "error":
            yield json.dumps({"error": f"generation failed: {event.error}"}) + "\n"
        else:
            if tools is not None:
                held, calls = tools.finish()
                if held:
                    yield line(piece(held))
                if calls:
                    yield line({"message": {"role": "assistant", "content": "",
                                            "tool_calls": [c.ollama() for c in calls]}})
            yield json.dumps({**_final(backend, event), **last}) + "\n"


async def chat(request: Request) -> Response:
    backend: Backend = request.app.state.backend
    req: ChatRequest = await _parse(request, ChatRequest)
    backend.check_model(req.model)
    if not req.messages:  # Ollama answers an empty chat by loading the model
        return JSONResponse({"model": backend.model_id, "created_at": _now(), "message": {"role": "assistant", "content": ""},
                             "done_reason": "load", "done": True})
    tools = read_tools(req.tools, None)
    offered = tools is not None and tools.offered
    gen = await _submit(backend, req, backend.chat_prompt(req.messages, tools), tools)
    if req.stream:
        def piece(text: str) -> dict[str, Any]:
            return {"message": {"role": "assistant", "content": text}}

        lines = _ndjson(backend, gen, piece, {"message": {"role": "assistant", "content": ""}},
                        ToolStream() if offered else None)
        return StreamingResponse(lines, media_type="application/x-ndjson")
    text, done = await backend.run_to_end(gen, request.is_disconnected)
    message: dict[str, Any] = {"role": "assistant", "content": text}
    if offered:
        content, calls = parse_calls(text)
        message = {"role": "assistant", "content": content, **({"tool_calls": [c.ollama() for c in calls]} if calls else {})}
    return JSONResponse({**_final(backend, done), "message": message})


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
    gen = await _submit(backend, req, prompt)
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
    body = await json_object(request, empty={})
    backend.check_model(str(body.get("model") or body.get("name") or ""))
    arch = backend.header.architecture
    info = {k: v for k, v in backend.header.metadata.items() if not k.startswith("tokenizer.ggml.")}
    info[f"{arch}.context_length"] = backend.max_context
    return JSONResponse({
        "modelfile": "", "parameters": "", "template": backend.template.source,
        "details": _model_card(backend)["details"], "model_info": info, "capabilities": ["completion", "tools"],
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
