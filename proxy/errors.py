"""Errors as OpenAI's SDK expects them: `{"error": {"message", "type", "param", "code"}}` and a status.

A client mistake is a 4xx naming what to fix; a failure of the backends is a 429/502/503/504 with
`Retry-After` where waiting helps. No response ever carries a traceback.
"""

from __future__ import annotations

import re
from typing import Any

from starlette.responses import Response

from proxy.responses import dumps


class ProxyError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", code: str | None = None,
                 param: str | None = None, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type_, code, param
        self.retry_after = retry_after

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(max(1, round(self.retry_after)))} if self.retry_after is not None else {}

    def response(self, extra_headers: dict[str, str] | None = None) -> Response:
        return Response(dumps(self.body()), status_code=self.status, media_type="application/json",
                        headers={**self.headers(), **(extra_headers or {})})


def bad_request(message: str, param: str | None = None, code: str | None = None) -> ProxyError:
    return ProxyError(400, message, param=param, code=code)


def unauthorized(message: str) -> ProxyError:
    return ProxyError(401, message, type_="authentication_error", code="invalid_api_key")


def from_backend(exc: Exception, all_unreachable: bool, cooldown_s: float | None) -> ProxyError:
    """The error a client sees when the Router gave up, from its last exception and what we saw on the way.

    `all_unreachable`: every deployment tried failed to connect or was cooling down; `cooldown_s`: the
    shortest remaining cooldown in the alias's chain when every deployment in it is cooling down.
    """
    import litellm

    text = _clean(str(exc))
    if isinstance(exc, litellm.ContextWindowExceededError):
        return ProxyError(400, f"the prompt is longer than every model of this alias can take: {text}",
                          code="context_length_exceeded", param="messages")
    if cooldown_s is not None:
        return ProxyError(429, f"every deployment of this alias is cooling down after failures; retry in "
                               f"{max(1, round(cooldown_s))}s", type_="rate_limit_error", code="deployments_cooling_down",
                          retry_after=cooldown_s)
    if isinstance(exc, litellm.Timeout):
        return ProxyError(504, f"no deployment answered in time: {text}", type_="timeout_error", code="timeout")
    if all_unreachable:
        return ProxyError(503, f"no backend of this alias is reachable: {text}", type_="service_unavailable",
                          code="backends_unreachable", retry_after=5)
    if isinstance(exc, litellm.BadRequestError):
        return ProxyError(400, text, code="invalid_request")
    if isinstance(exc, litellm.RateLimitError):
        return ProxyError(429, text, type_="rate_limit_error", code="rate_limited", retry_after=5)
    return ProxyError(502, f"the backend failed: {text}", type_="upstream_error", code="backend_error")


_PREFIX = re.compile(r"^(?:litellm\.)?[A-Za-z]+(?:Error|Exception|Timeout)\s*[:-]\s*")


def _clean(message: str) -> str:
    """LiteLLM's messages stack class-name prefixes and debug blocks: keep the first line that says something."""
    first = message.split("\n", 1)[0].strip()
    while m := _PREFIX.match(first):
        first = first[m.end():]
    return first[:500]
