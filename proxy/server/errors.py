"""Errors as OpenAI's SDK expects them: `{"error": {"message", "type", "param", "code"}}` and a status.

A client mistake is a 4xx naming what to fix; a failure of the backends is a 429/502/503/504 with
`Retry-After` where waiting helps. No response ever carries a traceback.
"""

from __future__ import annotations

import re
from typing import Any

from starlette.responses import Response

from proxy.server.responses import dumps


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


def from_backend(exc: Exception, all_unreachable: bool, cooldown_s: float | None,
                 unreachable: list[str] | None = None) -> ProxyError:
    """The error a client sees when the Router gave up, from its last exception and what we saw on the way.

    `all_unreachable`: every deployment tried failed to connect or was cooling down; `cooldown_s`: the
    shortest remaining cooldown in the alias's chain when every deployment in it is cooling down;
    `unreachable`: the models that could not be reached, named in the message instead of the provider's text.
    """
    import litellm

    text = _clean(str(exc))
    if isinstance(exc, litellm.ContextWindowExceededError):
        return context_too_long(None, None, [], None)
    if cooldown_s is not None:
        return ProxyError(429, f"every deployment of this alias is cooling down after failures; retry in "
                               f"{max(1, round(cooldown_s))}s", type_="rate_limit_error", code="deployments_cooling_down",
                          retry_after=cooldown_s)
    if isinstance(exc, litellm.Timeout):
        return ProxyError(504, f"no deployment answered in time: {text}", type_="timeout_error", code="timeout")
    if all_unreachable:
        named = f": cannot connect to {', '.join(unreachable)}" if unreachable else f": {text}"
        return ProxyError(503, f"no backend of this alias is reachable{named}", type_="service_unavailable",
                          code="backends_unreachable", retry_after=5)
    if isinstance(exc, litellm.BadRequestError):
        return ProxyError(400, text, code="invalid_request")
    if isinstance(exc, litellm.RateLimitError):
        return ProxyError(429, text, type_="rate_limit_error", code="rate_limited", retry_after=5)
    return ProxyError(502, f"the backend failed: {text}", type_="upstream_error", code="backend_error")


def context_too_long(alias: str | None, largest: tuple[int, str] | None, unreachable: list[str],
                     prompt_tokens: int | None, param: str = "messages") -> ProxyError:
    """400 context_length_exceeded in our words: the largest context that was reachable (tokens, model), and the
    models that might have taken the prompt but could not be reached."""
    prompt = f"the prompt ({prompt_tokens} tokens)" if prompt_tokens else "the prompt"
    of = f"'{alias}'" if alias else "this alias"
    biggest = f"the largest context among them is {largest[0]} tokens ({largest[1]})" if largest else ""
    if unreachable:
        message = (f"{prompt} is longer than every reachable model of {of} can take"
                   + (f": {biggest}" if biggest else "")
                   + f"; models that may take a longer prompt could not be reached: {', '.join(unreachable)}. "
                     "Shorten the prompt, or start those backends")
    else:
        message = f"{prompt} is longer than every model of {of} can take" + (f": {biggest}" if biggest else "")
    return ProxyError(400, message, code="context_length_exceeded", param=param)


_PREFIX = re.compile(r"^(?:litellm\.)?[A-Za-z_]+(?:Error|Exception|Timeout)\s*[:-]\s*")
# what Python's reprs and aiohttp add to a provider's message: object addresses, SSL contexts, socket tuples
_NOISE = re.compile(r"\s*(?:ssl:)?<[^<>]* at 0x[0-9a-f]+>|\s*ssl:(?:default|None|False)|\s*\[Connect call failed [^\]]*\]")


def _clean(message: str) -> str:
    """LiteLLM's messages stack class-name prefixes and debug blocks: keep the first line that says something,
    without the object reprs some providers' exceptions carry."""
    first = message.split("\n", 1)[0].strip()
    while m := _PREFIX.match(first):
        first = first[m.end():]
    return _NOISE.sub("", first).strip()[:500]
