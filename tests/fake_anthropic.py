"""A local stand-in for api.anthropic.com in passthrough tests: the cloud cannot be reached from here.

It keeps every request's raw body and headers, so tests check what the proxy forwarded byte for byte. A message
answers `answer from claude` with usage that has cache creation and cache read tokens; a stream sends Anthropic's
events one chunk at a time, and with `gate` set it holds every chunk after the first until the test releases it
(a proxy that buffered the stream would never deliver the first one). `key` is the only key it accepts, as
`x-api-key` or as `Authorization: Bearer` (how the anthropic SDK sends its api_key).
"""

from __future__ import annotations

import asyncio
import json
import threading
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

USAGE = {"input_tokens": 12, "output_tokens": 5, "cache_creation_input_tokens": 100, "cache_read_input_tokens": 2000}


def sse(data: dict[str, Any]) -> bytes:
    return f"event: {data['type']}\ndata: {json.dumps(data)}\n\n".encode()


class FakeAnthropic:
    def __init__(self, key: str = "sk-ant-test") -> None:
        self.key = key
        self.bodies: list[bytes] = []
        self.headers: list[dict[str, str]] = []
        self.paths: list[str] = []
        self.gate: threading.Event | None = None
        self.app = Starlette(routes=[
            Route("/v1/messages", self.messages, methods=["POST"]),
            Route("/v1/messages/count_tokens", self.count_tokens, methods=["POST"]),
        ])

    async def _take(self, request: Request) -> dict[str, Any] | Response:
        raw = await request.body()
        self.bodies.append(raw)
        self.headers.append(dict(request.headers))
        self.paths.append(request.url.path + (f"?{request.url.query}" if request.url.query else ""))
        if self.key not in (request.headers.get("x-api-key"), request.headers.get("authorization", "")[7:]):
            return JSONResponse({"type": "error", "error": {"type": "authentication_error",
                                                            "message": "invalid x-api-key"}}, status_code=401)
        return json.loads(raw)

    async def count_tokens(self, request: Request) -> Response:
        body = await self._take(request)
        if isinstance(body, Response):
            return body
        return JSONResponse({"input_tokens": 4242})

    async def messages(self, request: Request) -> Response:
        body = await self._take(request)
        if isinstance(body, Response):
            return body
        message = {"id": "msg_fake01", "type": "message", "role": "assistant", "model": body["model"],
                   "content": [{"type": "text", "text": "answer from claude"}], "stop_reason": "end_turn",
                   "stop_sequence": None, "usage": USAGE}
        if not body.get("stream"):
            return JSONResponse(message, headers={"request-id": "req_fake01", "anthropic-organization-id": "org-1"})
        return StreamingResponse(self._events(message), media_type="text/event-stream",
                                 headers={"request-id": "req_fake02"})

    async def _events(self, message: dict[str, Any]):  # type: ignore[no-untyped-def]
        start = {**message, "content": [], "stop_reason": None,
                 "usage": {**USAGE, "output_tokens": 1}}
        events = [
            {"type": "message_start", "message": start},
            {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
            {"type": "ping"},
            {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "answer"}},
            {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": " from claude"}},
            {"type": "content_block_stop", "index": 0},
            {"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": None},
             "usage": {"output_tokens": USAGE["output_tokens"]}},
            {"type": "message_stop"},
        ]
        for i, data in enumerate(events):
            if i == 1 and self.gate is not None:
                await asyncio.to_thread(self.gate.wait, 30)
            yield sse(data)
            await asyncio.sleep(0.01)
