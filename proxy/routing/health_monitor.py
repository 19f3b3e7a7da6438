"""Is each deployment reachable? Cheap probes in the background, never an inference call.

On a CPU one inference call can take a minute, so health is judged by the endpoints each server
offers for it: the tinygrad backend's /health (which also says `loading`, or `unhealthy` with the
reason when its engine cannot serve), Ollama's /api/version, an OpenAI-compatible server's /v1/models.
Cloud deployments are not probed: they are assumed reachable and the Router's cooldowns speak for them.
A backend that says it is unhealthy is put into the Router's cooldown until a probe finds it well, so
its chains fall back at once instead of waiting on it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import httpx

from proxy.routing.router import Deployment

PROBE_INTERVAL_S = 5.0
PROBE_TIMEOUT_S = 2.0
UNHEALTHY_COOLDOWN_S = 2 * PROBE_INTERVAL_S + PROBE_TIMEOUT_S  # renewed by every probe that finds it so
log = logging.getLogger("delegate")


@dataclass
class Probe:
    reachable: bool | None  # None: not probed (cloud)
    status: str  # ready | loading | unhealthy | unreachable | error | not_probed
    detail: str | None = None
    checked_at: float | None = None
    context_length: int | None = None  # what a tinygrad backend reports


def _probe_url(d: Deployment) -> str | None:
    if d.api_base is None:
        return None
    base = d.api_base.rstrip("/")
    if d.provider == "tinygrad":
        return base.removesuffix("/v1") + "/health"
    if d.provider in ("ollama", "ollama_chat"):
        return base + "/api/version"
    if d.is_local:
        return base + ("/models" if base.endswith("/v1") else "/v1/models")
    return None


class HealthMonitor:
    def __init__(self, deployments: dict[str, Deployment],
                 cool_down: Callable[[str, str, float], None] | None = None) -> None:
        """`cool_down(deployment id, reason, seconds)` takes an unhealthy deployment out of rotation."""
        self.deployments = deployments
        self.cool_down = cool_down
        self.probes: dict[str, Probe] = {i: Probe(None, "not_probed") for i in deployments}
        self._task: asyncio.Task[None] | None = None
        self._client: httpx.AsyncClient | None = None

    async def start(self) -> None:
        self._client = httpx.AsyncClient(timeout=PROBE_TIMEOUT_S)
        await self.check_all()
        self._task = asyncio.create_task(self._loop())

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
        if self._client:
            await self._client.aclose()

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(PROBE_INTERVAL_S)
            await self.check_all()

    async def check_all(self) -> None:
        # one probe per distinct URL: many deployments share one Ollama or one backend
        by_url: dict[str, list[str]] = {}
        for dep_id, d in self.deployments.items():
            url = _probe_url(d)
            if url is None:
                self.probes[dep_id] = Probe(None, "not_probed")
            else:
                by_url.setdefault(url, []).append(dep_id)
        results = await asyncio.gather(*(self._probe(url) for url in by_url))
        for ids, probe in zip(by_url.values(), results, strict=True):
            for dep_id in ids:
                if probe.status == "unhealthy" and self.probes[dep_id].status != "unhealthy":
                    log.error("deployment %s is unhealthy: %s", dep_id, probe.detail)
                self.probes[dep_id] = probe
                if probe.status == "unhealthy" and self.cool_down is not None:
                    self.cool_down(dep_id, f"unhealthy: {probe.detail}", UNHEALTHY_COOLDOWN_S)

    async def _probe(self, url: str) -> Probe:
        assert self._client is not None
        now = time.time()
        try:
            r = await self._client.get(url)
        except httpx.HTTPError as e:
            return Probe(False, "unreachable", f"{type(e).__name__}: {e}" if str(e) else type(e).__name__, now)
        body: dict[str, Any] = {}
        context = None
        if url.endswith("/health"):
            try:
                body = r.json()
                context = int(body.get("context_length") or 0) or None
            except (ValueError, AttributeError, TypeError):
                body, context = {}, None
        if r.status_code == 503 and body.get("status") == "unhealthy":
            return Probe(True, "unhealthy", str(body.get("problem") or "the backend says it is unhealthy")[:300], now,
                         context)
        if r.status_code == 503 and url.endswith("/health"):
            return Probe(True, "loading", "the backend is loading its model", now, context)
        if r.status_code >= 400:
            return Probe(True, "error", f"HTTP {r.status_code}", now)
        return Probe(True, "ready", None, now, context)

    def any_ready(self) -> bool:
        return any(p.status in ("ready", "not_probed") for p in self.probes.values())

    def report(self, cooldowns: dict[str, float]) -> list[dict[str, Any]]:
        out = []
        for dep_id, d in self.deployments.items():
            p = self.probes[dep_id]
            out.append({
                "id": dep_id, "model_name": d.group, "model": d.model, "api_base": d.api_base,
                "status": p.status, "reachable": p.reachable, "detail": p.detail, "checked_at": p.checked_at,
                "cooldown_remaining_s": round(cooldowns[dep_id], 1) if dep_id in cooldowns else None,
            })
        return out
