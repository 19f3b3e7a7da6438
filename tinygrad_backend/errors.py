"""Errors a client gets, in the shape its API family expects.

OpenAI clients (`/v1/...`) get `{"error": {"message", "type", "param", "code"}}`; Ollama clients
(`/api/...`) get `{"error": "message"}`, as Ollama itself answers.
"""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError
from starlette.requests import Request
from starlette.responses import JSONResponse


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", code: str | None = None,
                 param: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type_, code, param
        self.headers = headers or {}


def from_validation(err: ValidationError) -> APIError:
    first = err.errors()[0]
    param = ".".join(str(p) for p in first["loc"]) or None
    return APIError(400, f"invalid value for '{param}': {first['msg']}" if param else first["msg"], param=param)


def response(request: Request, err: APIError) -> JSONResponse:
    body: dict[str, Any]
    if request.url.path.startswith("/api/"):
        body = {"error": err.message}
    else:
        body = {"error": {"message": err.message, "type": err.type, "param": err.param, "code": err.code}}
    return JSONResponse(body, status_code=err.status, headers=err.headers)
