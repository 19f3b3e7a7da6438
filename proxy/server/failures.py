"""When a whole chain failed: the status and message the client should see, from what each attempt met.

The Router raises its last exception; the trace (usage/trace.py) holds every attempt. From them: 400
context_length_exceeded when the prompt is too long for whatever could be reached (naming the largest
context and the deployments that might take more but are down), 503 with Retry-After when the chain is
unreachable or cooling down, else the provider's error in our words (errors.py never echoes raw
provider text). Every endpoint family answers its failures through here.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

import litellm

from proxy.routing.router import active_cooldowns
from proxy.server.errors import ProxyError, context_too_long, from_backend
from proxy.usage.trace import Attempt, RequestTrace

if TYPE_CHECKING:
    from proxy.server.app import Proxy

_STATED_CONTEXT = re.compile(r"maximum context length is (\d+)")  # OpenAI's wording, and the tinygrad backend's
_PROMPT_TOKENS = re.compile(r"(?:messages|prompt) resulted in (\d+) tokens")


def connection_failure(exc: BaseException | None) -> bool:
    if isinstance(exc, litellm.ServiceUnavailableError | litellm.APIConnectionError):
        return True
    text = str(exc).lower()
    return any(s in text for s in ("connection error", "connection refused", "connecterror", "unreachable",
                                   "all connection attempts failed", "name or service not known"))


def chain_failure(proxy: Proxy, trace: RequestTrace, exc: Exception) -> ProxyError:
    """Turn the Router's final exception into the status the client should see."""
    failed = [a for a in trace.attempts if not a.ok]
    chain_ids = proxy.chain_ids.get(trace.alias, [])
    cooling = active_cooldowns(proxy.router, chain_ids) if chain_ids else {}
    attempted = {a.deployment_id for a in failed}
    untried = [i for i in chain_ids if i not in attempted]
    all_cooling = bool(untried) and all(i in cooling for i in untried) and not failed
    unreachable = (bool(failed) or bool(cooling)) and all(connection_failure(a.exception) for a in failed)
    too_long = [a for a in failed if isinstance(a.exception, litellm.ContextWindowExceededError)]
    if isinstance(exc, litellm.ContextWindowExceededError) or (too_long and all(
            a in too_long or connection_failure(a.exception) for a in failed)):
        # some deployment said "too long" and the others could not be reached: the prompt's length is the answer
        return _too_long(proxy, trace, too_long, failed)
    down = list(dict.fromkeys(proxy.deployments[a.deployment_id].model for a in failed
                              if a.deployment_id in proxy.deployments and connection_failure(a.exception)))
    return from_backend(exc, unreachable, min(cooling.values()) if all_cooling and cooling else None, down)


def _too_long(proxy: Proxy, trace: RequestTrace, too_long: list[Attempt], failed: list[Attempt]) -> ProxyError:
    """400 context_length_exceeded naming the largest context that was reachable and the deployments that could
    not be reached and might take more (context_window_fallbacks whose backend is down or cooling down)."""
    contexts: dict[str, int] = {}
    prompt_tokens = None
    for a in too_long:
        text = str(a.exception)
        stated = _STATED_CONTEXT.search(text)
        known = int(stated.group(1)) if stated else proxy.known_context(a.deployment_id)
        if known:
            contexts[a.deployment_id] = known
        if prompt_tokens is None and (m := _PROMPT_TOKENS.search(text)):
            prompt_tokens = int(m.group(1))
    largest = max(((n, proxy.deployments[d].model) for d, n in contexts.items() if d in proxy.deployments), default=None)
    down = [a.deployment_id for a in failed if connection_failure(a.exception)]
    candidates = proxy.chain_ids.get(trace.alias, []) + context_fallback_ids(proxy, trace.alias)
    tried = {a.deployment_id for a in failed}
    cooling = active_cooldowns(proxy.router, [i for i in candidates if i not in tried]) if candidates else {}
    larger = []
    for dep_id in dict.fromkeys(down + list(cooling)):
        dep, known = proxy.deployments.get(dep_id), proxy.known_context(dep_id)
        if dep is not None and (known is None or largest is None or known > largest[0]):
            larger.append(dep.model + (" (cooling down)" if dep_id in cooling else ""))
    return context_too_long(trace.alias, largest, list(dict.fromkeys(larger)), prompt_tokens,
                            param="prompt" if trace.endpoint == "text" else "messages")


def context_fallback_ids(proxy: Proxy, alias: str) -> list[str]:
    """The deployments context_window_fallbacks can move a request for `alias` to, from any group of its chain."""
    chain = proxy.settings.chain(alias)
    groups = [g for entry in proxy.settings.router_settings.get("context_window_fallbacks") or []
              for src, dests in entry.items() if src in chain for g in dests]
    return [i for g in dict.fromkeys(groups) for i, d in proxy.deployments.items() if d.group == g]
