"""The fastest OpenAI-compatible backend we can write: a raw ASGI app, for measuring proxy overhead.

python bench/fast_backend.py PORT
"""

from __future__ import annotations

import json
import sys

import uvicorn

ANSWER = json.dumps({
    "id": "chatcmpl-bench", "object": "chat.completion", "created": 1, "model": "fast",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hello from the fast backend."},
                 "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 12, "completion_tokens": 6, "total_tokens": 18},
}).encode()
WORDS = ["Hello", " from", " the", " fast", " backend", "."]


def _chunk(delta: dict, finish: str | None = None) -> bytes:
    body = {"id": "chatcmpl-bench", "object": "chat.completion.chunk", "created": 1, "model": "fast",
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
    return b"data: " + json.dumps(body).encode() + b"\n\n"


STREAM = b"".join([_chunk({"role": "assistant", "content": WORDS[0]})] + [_chunk({"content": w}) for w in WORDS[1:]]
                  + [_chunk({}, "stop")])
USAGE = b"data: " + json.dumps({"id": "chatcmpl-bench", "object": "chat.completion.chunk", "created": 1, "model": "fast",
                                "choices": [], "usage": {"prompt_tokens": 12, "completion_tokens": 6,
                                                         "total_tokens": 18}}).encode() + b"\n\n"


async def app(scope, receive, send):  # type: ignore[no-untyped-def]
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            break
    if scope["method"] == "GET":
        payload = b'{"object":"list","data":[{"id":"fast","object":"model"}]}'
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": payload})
        return
    request = json.loads(body or b"{}")
    if request.get("stream"):
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream")]})
        usage = USAGE if (request.get("stream_options") or {}).get("include_usage") else b""
        await send({"type": "http.response.body", "body": STREAM + usage + b"data: [DONE]\n\n"})
        return
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": ANSWER})


if __name__ == "__main__":
    uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), log_level="warning", access_log=False,
                loop="uvloop", http="httptools")
