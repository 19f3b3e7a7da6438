"""The proxy as one ASGI app: its parts, built once, and the routes of each endpoint family.

A request travels: admission (admission.py: who asks, the body, the key's limits) -> its endpoint family
(completions.py for OpenAI's, messages.py for Anthropic's; each API is one module) -> the Router with the
alias's fallbacks (routing/router.py) -> a provider (LiteLLM's, or routing/tinygrad_provider.py) -> the
answer, with headers saying who served it -> one usage row (usage/). A chain that failed answers through
failures.py. Starlette rather than FastAPI: every request is parsed and checked by hand anyway, for each
API's own error shape, and the hot path stays short.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import AsyncIterator
from functools import partial
from typing import Any

import litellm
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from proxy.routing.auto import AUTO, AutoRouter
from proxy.routing.health_monitor import HealthMonitor
from proxy.routing.router import Deployment, build_router, cool_down
from proxy.routing.shared_state import SharedRateLimiter, redis_settings
from proxy.server import anthropic_protocol
from proxy.server.admission import Admission
from proxy.server.auth import Auth
from proxy.server.completions import Completions, count_cut_short
from proxy.server.errors import ProxyError
from proxy.server.health import Health
from proxy.server.mcp_http import McpEndpoint
from proxy.server.messages import Messages
from proxy.server.models import Models
from proxy.settings import Settings
from proxy.usage.keys import KeyStore, RateLimiter
from proxy.usage.recorder import Recorder
from proxy.usage.savings_page import SavingsPage
from proxy.usage.spend import SpendAPI
from proxy.usage.store import UsageStore
from proxy.usage.trace import RequestTrace, UsageLogger, usage_logger

log = logging.getLogger("delegate")


class Proxy:
    """The parts every endpoint family shares: the Router and its deployments, the keys, the usage books."""

    def __init__(self, settings: Settings, master_key: str | None, store: UsageStore,
                 routing: tuple[litellm.Router, dict[str, Deployment]] | None = None,
                 usage: UsageLogger = usage_logger) -> None:
        self.settings = settings
        self.router, self.deployments = routing or build_router(settings)
        self.store = store
        self.keys = KeyStore(store)
        self.auth = Auth(master_key, self.keys)
        self.rates = RateLimiter()
        redis_conn = redis_settings(settings.router_settings)
        self.shared_rates = SharedRateLimiter(redis_conn) if redis_conn else None
        self.usage = usage
        self.health = HealthMonitor(self.deployments, partial(cool_down, self.router))
        self.auto = AutoRouter(settings.delegate.auto.aliases or [])  # model="auto"; off when it has no aliases
        self.known = set(settings.groups) | ({AUTO} if self.auto.aliases else set())
        self.started = int(time.time())
        self.chain_ids = {g: [i for grp in settings.chain(g) for i, d in self.deployments.items() if d.group == grp]
                          for g in settings.groups}
        self.model_info = {dep_id: settings.model_list[i].get("model_info") or {} for i, dep_id in enumerate(self.deployments)}
        self.recorder = Recorder(store, self.deployments, settings.delegate, {g: settings.chain(g) for g in settings.groups},
                                 self.keys)
        self.admission = Admission(self)
        self.draining = False

    def served(self, hidden: dict[str, Any], alias: str) -> tuple[Deployment | None, int]:
        """Which deployment answered (from LiteLLM's hidden params), and how far down the alias's chain it is."""
        dep = self.deployments.get(str(hidden.get("model_id")))
        if dep is None:
            return None, 0
        chain = self.settings.chain(alias)
        hops = chain.index(dep.group) if dep.group in chain else int(
            (hidden.get("additional_headers") or {}).get("x-litellm-attempted-fallbacks", 0))
        return dep, hops

    def served_headers(self, trace: RequestTrace, dep: Deployment | None, hops: int) -> dict[str, str]:
        return {"x-request-id": trace.request_id, "x-delegate-alias": trace.alias,
                "x-delegate-served-by": dep.model if dep else "none", "x-delegate-fallbacks": str(hops)}

    def known_context(self, dep_id: str) -> int | None:
        """A deployment's context: model_info.max_input_tokens in config.yaml, or what its backend reports."""
        probe = self.health.probes.get(dep_id)
        value = self.model_info.get(dep_id, {}).get("max_input_tokens") or (probe.context_length if probe else None)
        return int(value) if value else None

    def close_unfinished(self, trace: RequestTrace, error: BaseException) -> None:
        """Close a trace its request left open: what it delivered is counted and priced, and its hold settled."""
        dep = self.deployments.get(trace.served_by or "")
        count_cut_short(trace, dep.model if dep else trace.alias)
        self.usage.end(trace, "partial" if trace.delivered else "cancelled", error)


# --- the application ---------------------------------------------------------------------------------

async def _proxy_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ProxyError)
    return exc.response()


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    kind = {404: "not_found_error", 405: "invalid_request_error"}.get(exc.status_code, "invalid_request_error")
    error = ProxyError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}", type_=kind)
    return anthropic_protocol.error_response(error) if anthropic_protocol.is_messages_path(request.url.path) \
        else error.response()


async def _unexpected(request: Request, exc: Exception) -> Response:
    log.exception("unhandled error on %s", request.url.path)
    error = ProxyError(500, "internal error in the proxy; see its log", type_="server_error")
    return anthropic_protocol.error_response(error) if anthropic_protocol.is_messages_path(request.url.path) \
        else error.response()


def create_app(settings: Settings, master_key: str | None, store: UsageStore | None = None,
               routing: tuple[litellm.Router, dict[str, Deployment]] | None = None) -> Starlette:
    """`routing`: the Router and deployments already built from `settings` (delegate serve builds them while
    checking the config); built here otherwise."""
    proxy = Proxy(settings, master_key, store or UsageStore.open(), routing)
    completions, models, health = Completions(proxy), Models(proxy), Health(proxy)
    messages = Messages(proxy)

    async def list_models(request: Request) -> Response:
        """Anthropic's list shape for a client that speaks Anthropic's API (Claude Code's model discovery)."""
        if "anthropic-version" in request.headers:
            return await messages.models.list(request)
        return await models.list(request)

    async def check_key(request: Request) -> None:
        await proxy.auth.check_admin(request)

    spend = SpendAPI(proxy.store, check_key)
    savings = SavingsPage(proxy.store, settings.delegate.reference_model, proxy.auth)
    mcp = McpEndpoint(proxy.auth)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await proxy.recorder.tend_holds()  # the holds a crashed process left are released before the first request
        proxy.recorder.start()
        await proxy.health.start()
        try:
            async with mcp.running():  # the MCP SDK's session manager, for /mcp
                yield
        finally:
            proxy.draining = True
            await proxy.health.stop()
            # what shutdown's grace period cut off: its rows are written and its holds settled before the store closes
            for trace in proxy.usage.unfinished(proxy.recorder.record):
                proxy.close_unfinished(trace, ConnectionAbortedError("the proxy shut down before the request finished"))
            await proxy.usage.drain()
            await proxy.recorder.stop()
            await messages.aclose()
            if proxy.shared_rates is not None:
                await proxy.shared_rates.close()

    routes = [
        Route("/v1/chat/completions", completions.chat, methods=["POST"]),
        Route("/chat/completions", completions.chat, methods=["POST"]),
        Route("/v1/completions", completions.text, methods=["POST"]),
        Route("/completions", completions.text, methods=["POST"]),
        Route("/v1/messages", messages.create, methods=["POST"]),
        Route("/v1/messages/count_tokens", messages.count_tokens, methods=["POST"]),
        Route("/v1/models", list_models, methods=["GET"]),
        Route("/models", list_models, methods=["GET"]),
        Route("/health/liveliness", health.liveliness, methods=["GET"]),
        Route("/health/liveness", health.liveliness, methods=["GET"]),
        Route("/health/readiness", health.readiness, methods=["GET"]),
        Route("/health", health.report, methods=["GET"]),
        Route("/spend/logs", spend.logs, methods=["GET"]),
        Route("/global/spend/report", spend.report, methods=["GET"]),
        Route("/ui", savings.page, methods=["GET"]),
        Route("/ui/data", savings.data, methods=["GET"]),
        Route("/ui/login", savings.login, methods=["POST"]),
        Route("/ui/logout", savings.logout, methods=["POST"]),
        Route("/mcp", mcp, methods=["GET", "POST", "DELETE"]),
    ]
    app = Starlette(routes=routes, lifespan=lifespan,
                    exception_handlers={ProxyError: _proxy_error, HTTPException: _http_error, Exception: _unexpected})
    app.state.proxy = proxy
    return app
