"""Asking the Router for one request, as every endpoint family does: the whole chain under the request's
timeout, then who answered and what it used.

A chain that failed raises ChainFailed with the answer the client should get (failures.py) and how many
of the alias's groups were tried; the endpoint renders it in its API's shape (or, for the Messages API,
may pass the request on to Anthropic first). A request cancelled while it waits (shutdown's grace period
ran out) writes its row and releases its budget hold before it goes.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import litellm

from proxy.routing.router import Deployment
from proxy.server.errors import ProxyError
from proxy.server.failures import chain_failure
from proxy.usage.trace import RequestTrace

if TYPE_CHECKING:
    from proxy.server.app import Proxy


class ChainFailed(Exception):
    def __init__(self, error: ProxyError, cause: Exception, groups_tried: int) -> None:
        super().__init__(error.message)
        self.error, self.cause, self.groups_tried = error, cause, groups_tried


async def ask(proxy: Proxy, trace: RequestTrace, call: Callable[..., Awaitable[Any]], kwargs: dict[str, Any]) -> Any:
    try:
        async with asyncio.timeout(proxy.settings.delegate.request_timeout_s):  # no extra task, unlike wait_for
            return await call(**kwargs)
    except ProxyError:
        raise
    except asyncio.CancelledError:
        # the row and the release of the budget hold must not go down with the task
        proxy.usage.end(trace, "cancelled", ConnectionAbortedError("the proxy shut down before the answer came"))
        raise
    except Exception as exc:
        if isinstance(exc, TimeoutError):
            exc = litellm.Timeout("the request took longer than delegate.request_timeout_s", model=trace.alias,
                                  llm_provider="delegate")
        tried = {proxy.deployments[a.deployment_id].group for a in trace.attempts if a.deployment_id in proxy.deployments}
        raise ChainFailed(chain_failure(proxy, trace, exc), exc, len(tried)) from exc


def answered(proxy: Proxy, trace: RequestTrace, result: Any) -> tuple[Deployment | None, dict[str, str], str]:
    """Who served `result`: its deployment, the headers that say so, and the model name to show."""
    dep, hops = proxy.served(getattr(result, "_hidden_params", None) or {}, trace.alias)
    trace.served_by = dep.id if dep else None
    return dep, proxy.served_headers(trace, dep, hops), dep.model if dep else trace.alias


def count_whole(trace: RequestTrace, result: Any) -> None:
    """A whole (not streamed) answer's token counts and the backend's timings, onto the trace."""
    trace.first_token_at = trace.finished_at = time.perf_counter()
    usage = getattr(result, "usage", None)
    trace.prompt_tokens = int(getattr(usage, "prompt_tokens", 0) or 0)
    trace.completion_tokens = int(getattr(usage, "completion_tokens", 0) or 0)
    trace.backend_timings = (getattr(result, "_hidden_params", None) or {}).get("timings")
