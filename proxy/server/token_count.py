"""A Messages API request's input tokens where it would be served here: the count of the deployment the Router
would give it, by that deployment's own tokenizer and chat template, never a guess.

The request arrives translated as /v1/messages translates it (anthropic_protocol.to_openai, LiteLLM's adapter),
and the deployment is found as the Router would reach it: the alias's chain in order, past a deployment cooling
down (the Router's cooldowns, which also hold the backends the health monitor found unhealthy), one whose backend
says it is loading, one the health monitor cannot reach, and a tinygrad backend that cannot be connected to now
(as serving would fail over on it). A tinygrad deployment counts on its backend's POST /v1/chat/tokenize
(tinygrad_backend/tokenize_api.py: the completion's own code path), with its api_base and api_key; its count is
the `usage.input_tokens` the same request gets there. A prompt longer than that deployment's context goes on
where the Router would send it (context_window_fallbacks), and is counted there the same way.

What would serve it but cannot count (Ollama, which has no such route; any other OpenAI-compatible server; a
cloud model) is a 404 `not_found_error` naming it. Nothing reachable is a 503 (the Messages API's 529
overloaded_error), every deployment cooling down a 429, as the same request would get from /v1/messages.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import httpx

from proxy.routing.router import Deployment, active_cooldowns
from proxy.routing.tinygrad_provider import DEFAULT_API_BASE
from proxy.server.errors import ProxyError
from proxy.server.failures import context_fallback_ids

if TYPE_CHECKING:
    from proxy.server.app import Proxy

TOKENIZE_PATH = "/v1/chat/tokenize"
COUNT_TIMEOUT = httpx.Timeout(30.0, connect=2.0)  # a render of a long prompt on a busy CPU takes a while
PASSED = ("messages", "tools", "tool_choice")  # what the prompt is made of; the rest of the body changes nothing
NOT_SERVING = ("unhealthy", "loading")  # what a probe says of a backend the Router would not get an answer from
UNREACHABLE = ("backends_unreachable", "deployments_cooling_down")


@dataclass(frozen=True)
class Count:
    deployment: Deployment
    tokens: int
    context: int | None  # the backend's context, as it reports it

    @property
    def fits(self) -> bool:
        return self.context is None or self.tokens < self.context


class TokenCounter:
    def __init__(self, proxy: Proxy, client: Callable[[], httpx.AsyncClient]) -> None:
        """`client`: the pooled HTTP client to reach the backends with (the loop's own)."""
        self.proxy = proxy
        self.client = client
        self.params = {dep_id: proxy.settings.model_list[i].get("litellm_params") or {}
                       for i, dep_id in enumerate(proxy.deployments)}

    async def count(self, alias: str, kwargs: dict[str, Any]) -> Count:
        """The count of the deployment that would serve `kwargs` (OpenAI chat kwargs) for `alias`, or a ProxyError
        that says why there is none."""
        p = self.proxy
        found = await self._first(alias, p.chain_ids.get(alias, []), kwargs)
        if found.fits:
            return found
        larger = [i for i in context_fallback_ids(p, alias) if i != found.deployment.id]
        try:
            bigger = await self._first(alias, larger, kwargs) if larger else None
        except ProxyError as e:
            if e.code not in UNREACHABLE:
                raise
            bigger = None  # no larger model can be reached: the request is refused as too long, counted as it is
        return bigger if bigger is not None and bigger.fits else found

    async def at(self, dep: Deployment, kwargs: dict[str, Any]) -> Count:
        """The count of one tinygrad deployment's backend (httpx's error if it cannot be reached)."""
        params = self.params.get(dep.id, {})
        base = (dep.api_base or DEFAULT_API_BASE).rstrip("/").removesuffix("/v1")
        body = {"model": dep.model.split("/", 1)[-1], **{k: kwargs[k] for k in PASSED if kwargs.get(k) is not None}}
        key = params.get("api_key")
        r = await self.client().post(base + TOKENIZE_PATH, json=body, timeout=COUNT_TIMEOUT,
                                     headers={"Authorization": f"Bearer {key}"} if key else {})
        if r.status_code != 200:
            raise _Refused(r)
        data = r.json()
        return Count(dep, int(data["prompt_tokens"]), int(data["context_length"]) if data.get("context_length") else None)

    async def _first(self, alias: str, ids: list[str], kwargs: dict[str, Any]) -> Count:
        p = self.proxy
        cooling = active_cooldowns(p.router, ids) if ids else {}
        passed: list[str] = []  # what was passed over, and why
        for dep_id in ids:
            dep = p.deployments[dep_id]
            probe = p.health.probes.get(dep_id)
            status = probe.status if probe is not None else "not_probed"
            if dep_id in cooling or status in NOT_SERVING:
                passed.append(f"{dep.model} ({'cooling down' if dep_id in cooling else status})")
                continue
            if dep.provider != "tinygrad":
                if status == "unreachable":
                    passed.append(f"{dep.model} (unreachable)")
                    continue
                raise _cannot_count(alias, dep)
            try:
                return await self.at(dep, kwargs)
            except httpx.HTTPError as e:
                passed.append(f"{dep.model} (cannot connect: {type(e).__name__})")
            except _Refused as refused:
                passed.append(refused.passed_over(alias, dep))
        if passed and len(cooling) == len(passed):
            wait = min(cooling.values())
            raise ProxyError(429, f"cannot count tokens now: every deployment of '{alias}' is cooling down after "
                                  f"failures; retry in {max(1, round(wait))}s", type_="rate_limit_error",
                             code="deployments_cooling_down", retry_after=wait)
        raise ProxyError(503, f"cannot count tokens now: no deployment of '{alias}' is reachable"
                              + (f": {', '.join(passed)}" if passed else ""),
                         type_="service_unavailable", code="backends_unreachable", retry_after=5)


class _Refused(Exception):
    """A backend's answer other than a count."""

    def __init__(self, response: httpx.Response) -> None:
        self.status = response.status_code
        try:
            error = response.json().get("error") or {}
        except (ValueError, AttributeError):
            error = {}
        self.code = error.get("code") if isinstance(error, dict) else None
        message = error.get("message") if isinstance(error, dict) else None
        self.message = str(message or response.text[:200] or f"HTTP {self.status}")[:500]
        super().__init__(self.message)

    def passed_over(self, alias: str, dep: Deployment) -> str:
        """Why the Router would go past this deployment too (and so does the count); a ProxyError when the answer
        is the request's own fault (a 400 from the completion too), or the backend has no count route."""
        if self.status in (400, 413):
            raise ProxyError(self.status, f"{dep.model} refused the request: {self.message}",
                             code="request_too_large" if self.status == 413 else "invalid_request")
        if self.status == 404 and self.code != "model_not_found":
            raise _cannot_count(alias, dep, f"its backend at {dep.api_base} has no {TOKENIZE_PATH} (an older "
                                            "tinygrad_backend)")
        return f"{dep.model} (HTTP {self.status}: {self.message[:100]})"


def _cannot_count(alias: str, dep: Deployment, why: str | None = None) -> ProxyError:
    if why is None:
        why = ("Ollama has no route that counts a chat's tokens" if dep.provider in ("ollama", "ollama_chat")
               else "only a tinygrad backend can count tokens here")
    return ProxyError(404, f"token counting is not available: '{alias}' would be served by {dep.model}, and {why}",
                      type_="not_found_error", code="count_unavailable")
