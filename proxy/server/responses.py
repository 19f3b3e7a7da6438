"""Fast JSON and SSE encoding for responses (orjson), falling back to the stdlib for text orjson refuses."""

from __future__ import annotations

import json
from typing import Any

import orjson
from starlette.responses import Response


def dumps(obj: Any) -> bytes:
    try:
        return orjson.dumps(obj)
    except TypeError:  # lone surrogates, which orjson refuses, are the client's own text: send them back
        return json.dumps(obj).encode()


def json_response(obj: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(dumps(obj), status_code=status, media_type="application/json", headers=headers)


def sse(obj: Any) -> bytes:
    return b"data: " + dumps(obj) + b"\n\n"
