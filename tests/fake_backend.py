"""A small OpenAI-compatible server standing in for Ollama, vLLM or a cloud API in proxy tests.

It answers `answer from <name>` and records every request body, so tests can check what the proxy
forwarded. `mode` changes its behaviour while it runs: "ok", "stall" (never answers), "die" (streams
two chunks and drops the connection), "unavailable" (503), "slow" (streams 50 words, 0.1 s apart;
`cancelled` counts the streams whose client went away), "echo" (answers with the last message's content).
`delay` holds every answer back that many seconds. `health` is what its /health answers, as the tinygrad
backend's does: "ready", or "unhealthy" (503 with a problem). `headers` keeps every request's headers.
Run it as its own process with
`python -m tests.fake_backend --port P [--mode M] [--delay S]`. Prompts longer than `context` tokens
(4 characters each) get OpenAI's 400 context_length_exceeded.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route


class FakeBackend:
    def __init__(self, name: str, context: int = 100_000, mode: str = "ok", reply: str | None = None,
                 delay: float = 0.0) -> None:
        self.name, self.context, self.mode, self.delay = name, context, mode, delay
        self.reply = reply  # a fixed answer instead of "answer from <name>"
        self.health = "ready"
        self.requests: list[dict[str, Any]] = []
        self.headers: list[dict[str, str]] = []
        self.cancelled = 0
        self.app = Starlette(routes=[
            Route("/v1/chat/completions", self.chat, methods=["POST"]),
            Route("/v1/completions", self.completions, methods=["POST"]),
            Route("/v1/models", self.models, methods=["GET"]),
            Route("/health", self.health_check, methods=["GET"]),
        ])

    async def health_check(self, request: Request) -> Response:
        if self.health == "unhealthy":
            return JSONResponse({"status": "unhealthy", "problem": "the engine has made no progress for 61s"},
                                status_code=503)
        return JSONResponse({"status": "ready", "context_length": self.context})

    def prompt_tokens(self, body: dict[str, Any]) -> int:
        return max(1, sum(len(str(m.get("content") or "")) for m in body.get("messages", [])) // 4)

    async def models(self, request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [{"id": self.name, "object": "model"}]})

    async def completions(self, request: Request) -> Response:
        body = await request.json()
        self.requests.append(body)
        return JSONResponse({"id": "cmpl-1", "object": "text_completion", "created": int(time.time()), "model": self.name,
                             "choices": [{"index": 0, "text": f"answer from {self.name}", "finish_reason": "stop"}],
                             "usage": {"prompt_tokens": 2, "completion_tokens": 3, "total_tokens": 5}})

    async def chat(self, request: Request) -> Response:
        body = json.loads(await request.body())  # the stdlib keeps lone surrogates, as a real server might not
        self.requests.append(body)
        self.headers.append(dict(request.headers))
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.mode == "stall":
            await asyncio.sleep(3600)
        if self.mode == "unavailable":
            return JSONResponse({"error": {"message": "overloaded", "type": "server_error"}}, status_code=503)
        tokens = self.prompt_tokens(body)
        if tokens > self.context:
            return JSONResponse({"error": {
                "message": f"This model's maximum context length is {self.context} tokens. However, your messages "
                           f"resulted in {tokens} tokens. Please reduce the length of the messages.",
                "type": "invalid_request_error", "param": "messages", "code": "context_length_exceeded"}}, status_code=400)
        words = ["answer", " from", f" {self.name}"] if self.mode != "slow" else [f" w{i}" for i in range(50)]
        if self.reply is not None:
            words = [self.reply]
        if self.mode == "echo":
            words = [str(body["messages"][-1].get("content"))]
        usage = {"prompt_tokens": tokens, "completion_tokens": len(words), "total_tokens": tokens + len(words)}
        base = {"id": f"chatcmpl-{self.name}", "created": int(time.time()), "model": self.name}
        if not body.get("stream"):
            answer = {**base, "object": "chat.completion", "choices": [
                {"index": 0, "message": {"role": "assistant", "content": "".join(words)}, "finish_reason": "stop"}],
                "usage": usage}
            return Response(json.dumps(answer), media_type="application/json")  # ASCII escapes: surrogates survive

        async def frames():  # type: ignore[no-untyped-def]
            try:
                async for frame in _frames():
                    yield frame
            except (asyncio.CancelledError, GeneratorExit):
                self.cancelled += 1
                raise

        async def _frames():  # type: ignore[no-untyped-def]
            for i, w in enumerate(words):
                if self.mode == "die" and i == 2:
                    raise ConnectionResetError("fake backend died mid-stream")
                delta = {"role": "assistant", "content": w} if i == 0 else {"content": w}
                choice = {"index": 0, "delta": delta, "finish_reason": None}
                chunk = {**base, "object": "chat.completion.chunk", "choices": [choice]}
                yield f"data: {json.dumps(chunk)}\n\n"
                await asyncio.sleep(0.1 if self.mode == "slow" else 0.01)
            last = {**base, "object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}
            yield f"data: {json.dumps(last)}\n\n"
            if (body.get("stream_options") or {}).get("include_usage"):
                yield f"data: {json.dumps({**base, 'object': 'chat.completion.chunk', 'choices': [], 'usage': usage})}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(frames(), media_type="text/event-stream")


if __name__ == "__main__":
    import argparse

    import uvicorn

    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--name", default="fake")
    parser.add_argument("--mode", default="ok")
    parser.add_argument("--delay", type=float, default=0.0)
    args = parser.parse_args()
    uvicorn.run(FakeBackend(args.name, mode=args.mode, delay=args.delay).app, host="127.0.0.1", port=args.port,
                log_level="warning", access_log=False)
