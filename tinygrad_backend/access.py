"""Who may reach the backend, and how much they may send: checked before any route runs.

- An API key (`--api-key`, or DELEGATE_BACKEND_API_KEY), sent as `Authorization: Bearer <key>` (the
  proxy's tinygrad provider sends it). Required to bind beyond loopback: an open inference server on
  the network is Ollama's well-known exposure. /health stays open: it runs nothing and tells little.
- On loopback, only loopback Host headers: a web page on another origin that rebinds its DNS name to
  127.0.0.1 reaches the port, but its requests still carry its own host name.
- A body size limit, checked against Content-Length first and then counted as the body arrives.

A pure ASGI middleware, so the check costs a few dictionary lookups a request.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tinygrad_backend.errors import APIError

LOOPBACK_HOSTS = frozenset(("localhost", "127.0.0.1", "::1", "[::1]"))
OPEN_PATHS = frozenset(("/health",))


def host_name(host: str) -> str:
    """The name in a Host header, without its port ("[::1]:8001" -> "[::1]", "localhost:8001" -> "localhost")."""
    if host.startswith("["):
        return host[: host.find("]") + 1] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def is_loopback_host(host: str) -> bool:
    name = host_name(host.strip().lower())
    if name in LOOPBACK_HOSTS:
        return True
    try:
        return ipaddress.ip_address(name.strip("[]")).is_loopback
    except ValueError:  # a name, not an address: only "localhost" is known to be loopback
        return False


class AccessControl:
    def __init__(self, app: ASGIApp, api_key: str | None, loopback_only_hosts: bool, max_body_bytes: int) -> None:
        self.app = app
        self._key = api_key.encode("utf-8") if api_key else None
        self.loopback_only_hosts, self.max_body_bytes = loopback_only_hosts, max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        path: str = scope["path"]
        if self.loopback_only_hosts and not is_loopback_host(headers.get(b"host", b"").decode("latin-1")):
            await _refuse(send, path, 403, "this server answers only requests addressed to localhost (Host header)",
                          "permission_error", "host_not_allowed")
            return
        if self._key is not None and path not in OPEN_PATHS and not self._authorized(headers.get(b"authorization")):
            await _refuse(send, path, 401, "missing or wrong API key: send 'Authorization: Bearer <key>'",
                          "authentication_error", "invalid_api_key", {"WWW-Authenticate": "Bearer"})
            return
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body_bytes:
            await _refuse(send, path, 413, f"the request body is {int(length)} bytes; the limit is {self.max_body_bytes}",
                          "invalid_request_error", "request_too_large")
            return
        received = 0

        async def counted() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body_bytes:  # the app's error handler answers it in the API's shape
                    raise APIError(413, f"the request body exceeds the limit of {self.max_body_bytes} bytes",
                                   code="request_too_large")
            return message

        await self.app(scope, counted, send)

    def _authorized(self, header: bytes | None) -> bool:
        if not header or self._key is None:
            return False
        scheme, _, token = header.strip().partition(b" ")
        return scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self._key)


async def _refuse(send: Send, path: str, status: int, message: str, type_: str, code: str,
                  headers: dict[str, str] | None = None) -> None:
    """An error in the shape of the API the path belongs to (errors.py: Ollama's under /api/, else OpenAI's)."""
    body: dict[str, Any] = {"error": message} if path.startswith("/api/") else {
        "error": {"message": message, "type": type_, "param": None, "code": code}}
    raw = json.dumps(body).encode("utf-8")
    extra = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(raw)).encode()), *extra]})
    await send({"type": "http.response.body", "body": raw})
