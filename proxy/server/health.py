"""Health: liveness (the process answers), readiness (it can serve and record), and the deployments' report.

Readiness fails while the proxy drains, when no deployment is reachable, when shared state (Redis) is
down, or when usage rows cannot be written: a load balancer then sends requests elsewhere.
"""

from __future__ import annotations

import asyncio
from importlib.metadata import version
from typing import TYPE_CHECKING

from starlette.requests import Request
from starlette.responses import Response

from proxy.routing.router import active_cooldowns
from proxy.server.responses import json_response

if TYPE_CHECKING:
    from proxy.server.app import Proxy


class Health:
    def __init__(self, proxy: Proxy) -> None:
        self.proxy = proxy

    async def liveliness(self, request: Request) -> Response:
        return json_response({"status": "alive"})

    async def problems(self) -> list[str]:
        p = self.proxy
        problems = []
        if p.draining:
            problems.append("draining: shutting down")
        if not p.health.any_ready():
            problems.append("no deployment is reachable")
        if p.shared_rates is not None and (redis_problem := await p.shared_rates.problem()):
            problems.append(redis_problem)
        if problem := p.recorder.problem():
            problems.append(problem)
        else:
            try:
                await asyncio.to_thread(p.store.check_writable)
            except Exception as e:  # noqa: BLE001 - any failure means rows cannot be written now
                problems.append(f"usage store not writable: {e}")
        return problems

    async def readiness(self, request: Request) -> Response:
        problems = await self.problems()
        body = {"status": "ready" if not problems else "not_ready", "problems": problems,
                "config": str(self.proxy.settings.path), "litellm_version": version("litellm")}
        return json_response(body, status=200 if not problems else 503)

    async def report(self, request: Request) -> Response:
        p = self.proxy
        caller = await p.auth.check(request)
        cooldowns = active_cooldowns(p.router, list(p.deployments))
        deployments = p.health.report(cooldowns)
        if caller.issued is not None:  # status for anyone let in; where the backends live, for the operator only
            deployments = [{**d, "api_base": None, "detail": None} for d in deployments]
        healthy = [d for d in deployments if d["status"] in ("ready", "not_probed") and d["cooldown_remaining_s"] is None]
        return json_response({"healthy_count": len(healthy), "unhealthy_count": len(deployments) - len(healthy),
                              "deployments": deployments})
