"""The HTTP server: the OpenAI and Ollama routes, the prompt counter (/v1/chat/tokenize), /health, and errors in
each API's shape."""

from __future__ import annotations

import logging

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp

from tinygrad_backend import ollama_api, openai_api, tokenize_api
from tinygrad_backend.access import AccessControl
from tinygrad_backend.errors import APIError, response
from tinygrad_backend.service import Backend

log = logging.getLogger("tinygrad_backend")


MAX_BODY_BYTES = 8 * 1024 * 1024


async def health(request: Request) -> Response:
    """`loading` (503) until the model can answer, then `ready` (200); `unhealthy` (503, with the problem) when
    the engine cannot serve. Never runs inference."""
    body = request.app.state.backend.health()
    return JSONResponse(body, status_code=200 if body["status"] == "ready" else 503)


async def _api_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, APIError)
    return response(request, exc)


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
    message = f"{request.method} {request.url.path}: {exc.detail}"
    return response(request, APIError(exc.status_code, message, type_=kind))


async def _unexpected(request: Request, exc: Exception) -> Response:
    log.exception("unhandled error on %s", request.url.path)
    return response(request, APIError(500, "internal error in the backend; see its log", type_="server_error"))


def create_app(backend: Backend, api_key: str | None = None, loopback_only_hosts: bool = False,
               max_body_bytes: int = MAX_BODY_BYTES) -> ASGIApp:
    """The routes behind access control (access.py): an API key if one is given, loopback Host headers only
    when `loopback_only_hosts` (the server is bound to loopback), and a body size limit."""
    app = Starlette(
        routes=[Route("/health", health, methods=["GET"]), *openai_api.routes, *tokenize_api.routes,
                *ollama_api.routes],
        exception_handlers={APIError: _api_error, HTTPException: _http_error, Exception: _unexpected},
    )
    app.state.backend = backend
    return AccessControl(app, api_key, loopback_only_hosts, max_body_bytes)
