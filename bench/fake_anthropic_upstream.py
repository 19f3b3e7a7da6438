"""The fastest stand-in for api.anthropic.com we can write, for measuring what a passthrough adds: raw ASGI.

POST /v1/messages answers Anthropic's wire format: a `message` as JSON, or with `"stream": true` the whole event
sequence (message_start, content_block_start, ping, content_block_delta x2, content_block_stop, message_delta,
message_stop) as server-sent events in one write, as bench/fast_backend.py sends its chunks. A request without
the key (`x-api-key` or `Authorization: Bearer`) or without `anthropic-version` gets Anthropic's error shape,
401 or 400, so a proxy that forwarded the wrong headers shows as errors, not as fast answers.

python bench/fake_anthropic_upstream.py PORT [KEY]   (KEY defaults to sk-ant-bench)
"""

from __future__ import annotations

import json
import sys
from functools import cache
from typing import Any

import uvicorn

KEY = "sk-ant-bench"
USAGE = {"input_tokens": 12, "output_tokens": 6, "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0}
TEXT = ["Hello from", " the fake upstream."]


def message(model: str) -> dict[str, Any]:
    return {"id": "msg_bench01", "type": "message", "role": "assistant", "model": model,
            "content": [{"type": "text", "text": "".join(TEXT)}], "stop_reason": "end_turn", "stop_sequence": None,
            "usage": USAGE}


@cache  # the answer is the same for a model every time: built once, as fast_backend.py's are
def events(model: str) -> bytes:
    start = {**message(model), "content": [], "stop_reason": None, "usage": {**USAGE, "output_tokens": 1}}
    sequence: list[dict[str, Any]] = [
        {"type": "message_start", "message": start},
        {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
        {"type": "ping"},
        *({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": t}} for t in TEXT),
        {"type": "content_block_stop", "index": 0},
        {"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": None},
         "usage": {"output_tokens": USAGE["output_tokens"]}},
        {"type": "message_stop"},
    ]
    return b"".join(f"event: {e['type']}\ndata: {json.dumps(e)}\n\n".encode() for e in sequence)


@cache
def whole(model: str) -> bytes:
    return json.dumps(message(model)).encode()


def refusal(status: int, kind: str, text: str) -> tuple[int, bytes, bytes]:
    return status, b"application/json", json.dumps({"type": "error", "error": {"type": kind, "message": text}}).encode()


def answer(headers: dict[bytes, bytes], raw: bytes, key: str) -> tuple[int, bytes, bytes]:
    """(status, content type, body) for one POST /v1/messages."""
    if key.encode() not in (headers.get(b"x-api-key"), headers.get(b"authorization", b"")[7:]):
        return refusal(401, "authentication_error", "invalid x-api-key")
    if b"anthropic-version" not in headers:
        return refusal(400, "invalid_request_error", "anthropic-version: header is required")
    request = json.loads(raw)
    if request.get("stream"):
        return 200, b"text/event-stream", events(request["model"])
    return 200, b"application/json", whole(request["model"])


def make_app(key: str = KEY) -> Any:
    async def app(scope, receive, send):  # type: ignore[no-untyped-def]
        part = await receive()
        chunks = [part.get("body", b"")]
        while part.get("more_body"):  # a body uvicorn hands over in several parts
            part = await receive()
            chunks.append(part.get("body", b""))
        if scope["method"] != "POST" or scope["path"] != "/v1/messages":
            status, kind, body = refusal(404, "not_found_error", f"{scope['method']} {scope['path']}")
        else:
            status, kind, body = answer(dict(scope["headers"]), b"".join(chunks), key)
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", kind), (b"request-id", b"req_bench01")]})
        await send({"type": "http.response.body", "body": body})
    return app


if __name__ == "__main__":
    uvicorn.run(make_app(sys.argv[2] if len(sys.argv) > 2 else KEY), host="127.0.0.1", port=int(sys.argv[1]),
                log_level="warning", access_log=False, lifespan="off", loop="uvloop", http="httptools")
