"""Admission: what every endpoint family does before it asks the Router, in the order it happens.

1. Who is asking (auth.py): the master key, an issued key, or nobody while the proxy is open.
2. The body: at most `delegate.max_request_bytes`, and a JSON object (validation.py).
3. An issued key's limits: the aliases it may use, its request rate, and a reservation on its budget for
   the worst case (every byte of the prompt a token, every allowed completion token used), settled with
   the real cost when the request's usage row is written (usage/recorder.py).

Each endpoint family (completions.py, and any API added next to it) validates its own body shape between
steps 2 and 3; the rest is here, once.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import TYPE_CHECKING, Any

from starlette.requests import Request

from proxy.routing.auto import AUTO
from proxy.server import validation
from proxy.server.auth import Caller
from proxy.server.errors import ProxyError
from proxy.server.responses import dumps
from proxy.usage.keys import Hold
from proxy.usage.pricing import token_cost

if TYPE_CHECKING:
    from proxy.server.app import Proxy

BUDGET_DEFAULT_MAX_TOKENS = 4096  # a budgeted request that names no max_tokens is capped at this
PROMPT_TEMPLATE_BYTES = 256  # what a chat template adds around the messages, at most, in the worst case
# sent with the messages and rendered into the prompt: by the chat template (tools), or by a provider that turns
# them into a system prompt or a tool (a cloud fallback); each adds input tokens the budget must cover
RENDERED_FIELDS = ("tools", "tool_choice", "response_format")
TOOLS_TEMPLATE_BYTES = 1024  # the instructions wrapped around tools or a format (Anthropic's tool prompt: ~350 tokens)


class Admission:
    def __init__(self, proxy: Proxy) -> None:
        self.proxy = proxy

    async def read(self, request: Request) -> tuple[Caller, dict[str, Any]]:
        """The caller, then the body as a JSON object (413 past the size limit, 400 if it is not JSON)."""
        caller = await self.proxy.auth.check(request)
        limit = self.proxy.settings.delegate.max_request_bytes
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            raise ProxyError(413, f"the request body is {int(length)} bytes; the limit is {limit}",
                             code="request_too_large")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise ProxyError(413, f"the request body exceeds the limit of {limit} bytes", code="request_too_large")
            chunks.append(chunk)
        return caller, validation.parse_json(b"".join(chunks))

    def resolve(self, caller: Caller, model: str, prompt: Any) -> str:
        """The alias a request goes to: `model` itself, or for `auto` the one its classifier picks from the prompt,
        among the aliases the caller's key may use (routing/auto.py)."""
        if model != AUTO:
            return model
        may_use = caller.issued.aliases if caller.issued is not None else None
        alias = self.proxy.auto.choose(prompt, may_use)
        if alias is None:
            raise ProxyError(403, f"'auto' chooses among {', '.join(self.proxy.auto.aliases)}; this key may use none of "
                                  "them", type_="permission_error", code="alias_not_allowed", param="model")
        return alias

    def check_alias(self, caller: Caller, alias: str) -> None:
        """An issued key limited to some aliases may use only those."""
        issued = caller.issued
        if issued is not None and issued.aliases is not None and alias not in issued.aliases:
            raise ProxyError(403, f"this key may not use '{alias}'; it may use: {', '.join(issued.aliases) or 'nothing'}",
                             type_="permission_error", code="alias_not_allowed", param="model")

    async def admit(self, caller: Caller, alias: str, body: dict[str, Any], prompt: Any) -> Hold | None:
        """An issued key's limits: its aliases, its request rate, and a reservation on its budget."""
        issued = caller.issued
        if issued is None:
            return None
        self.check_alias(caller, alias)
        if issued.rpm is not None and (wait := await self._rate(issued.key_id, issued.rpm)) is not None:
            raise ProxyError(429, f"this key's limit of {issued.rpm} requests a minute is reached", type_="rate_limit_error",
                             code="rate_limited", retry_after=wait)
        if issued.budget_usd is None:
            return None
        # the worst case: every byte of the prompt (tools included) a token, every allowed completion token used
        completion = body.get("max_completion_tokens") or body.get("max_tokens")
        if completion is None:
            completion = body["max_tokens"] = BUDGET_DEFAULT_MAX_TOKENS
        amount = token_cost(self.proxy.settings.delegate.reference_model, worst_prompt_bytes(body, prompt), int(completion))
        try:
            reserved = await self._reserve(issued.key_id, amount)
        except Exception as e:
            raise ProxyError(503, "the key's budget cannot be checked now: the key store is unreachable; retry shortly",
                             type_="service_unavailable", code="budget_unavailable", retry_after=5) from e
        if not reserved:
            try:
                current = await asyncio.to_thread(self.proxy.keys.get, issued.key_id) or issued
            except Exception:  # noqa: BLE001 - only for the message: what the key check read will do
                current = issued
            raise ProxyError(429, f"this key's budget of ${issued.budget_usd:.2f} would be exceeded (spent "
                                  f"${current.spent_usd:.4f}, held ${current.reserved_usd:.4f}, this request up to "
                                  f"${amount:.4f})", type_="insufficient_quota", code="insufficient_quota")
        return reserved

    async def _reserve(self, kid: str, amount: float) -> Hold | None:
        """keys.reserve in a worker thread, off the event loop. A request cancelled while the thread runs does not
        leave its hold behind: the hold is released as soon as the thread has made it."""
        reserving = asyncio.ensure_future(asyncio.to_thread(self.proxy.keys.reserve, kid, amount))
        try:
            return await asyncio.shield(reserving)
        except asyncio.CancelledError:
            reserving.add_done_callback(self._release_orphan)
            raise

    def _release_orphan(self, reserving: asyncio.Future[Hold | None]) -> None:
        if reserving.cancelled() or reserving.exception() is not None or (hold := reserving.result()) is None:
            return
        with contextlib.suppress(RuntimeError):  # the loop is closing: the shutdown's own release takes it
            asyncio.get_running_loop().run_in_executor(None, self.proxy.keys.settle, hold, 0.0)

    async def _rate(self, kid: str, rpm: int) -> float | None:
        if self.proxy.shared_rates is not None:
            return await self.proxy.shared_rates.allow(kid, rpm)
        return self.proxy.rates.allow(kid, rpm)


def worst_prompt_bytes(body: dict[str, Any], prompt: Any) -> int:
    """The prompt's size as the backend will see it, in bytes: the messages, the template around them, and the
    tools and format rendered in with them."""
    size = len(dumps(prompt)) + PROMPT_TEMPLATE_BYTES
    size += sum(len(dumps(body[k])) for k in RENDERED_FIELDS if body.get(k) is not None)
    if body.get("tools") or body.get("response_format") is not None:
        size += TOOLS_TEMPLATE_BYTES
    return size
