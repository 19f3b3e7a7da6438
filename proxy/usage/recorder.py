"""From a finished request to a stored row: priced, queued, written off the request path, never dropped.

Rows wait in memory and a background task writes them in batches on a worker thread, so no response
waits for the disk. A failed write keeps its rows and is retried with backoff (a locked or read-only
file, a Postgres restart); /health/readiness shows the problem meanwhile. Shutdown flushes what is
pending. The store's primary key makes a retried batch harmless.

An issued key's budget hold is settled here with the row's reference cost: what the client received, whole
or cut short, is spent; a request that delivered nothing releases its hold. A settlement the store refuses is
retried with the hold upkeep (every HOLD_RENEW_S: renew this process's holds, release those of processes
that died holding them; proxy/usage/keys.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from pathlib import Path
from typing import Any

from proxy.routing.router import Deployment
from proxy.settings import DelegateSettings
from proxy.usage.keys import HOLD_RENEW_S, Hold, KeyStore
from proxy.usage.pricing import PricingError, cloud_cost, costs
from proxy.usage.store import PASSTHROUGH, UsageStore, delegate_home
from proxy.usage.trace import RequestTrace

log = logging.getLogger("delegate")
BATCH = 200
RETRY_MAX_S = 30.0


class Recorder:
    def __init__(self, store: UsageStore, deployments: dict[str, Deployment], settings: DelegateSettings,
                 chains: dict[str, list[str]], keys: KeyStore) -> None:
        self.store, self.deployments, self.settings, self.chains, self.keys = store, deployments, settings, chains, keys
        self.pending: list[dict[str, Any]] = []
        self.last_error: str | None = None
        # rows the store could not take before a shutdown wait here for the next start
        self.spool: Path = delegate_home() / "pending-usage.jsonl"
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._holds_task: asyncio.Task[None] | None = None
        self.unsettled: list[tuple[Hold, float]] = []  # settlements the store refused, retried with the upkeep

    # --- the row -----------------------------------------------------------------------------------

    def row(self, trace: RequestTrace) -> dict[str, Any]:
        dep = self.deployments.get(trace.served_by or "")
        chain = self.chains.get(trace.alias, [])
        # a stream cut short (by the client, the backend or a shutdown) delivered what it sent: that is priced too
        delivered = trace.status == "success" or trace.completion_tokens > 0
        attempts = [{"deployment": a.deployment_id, "model": a.model, "ok": a.ok, "error_class": a.error_class}
                    for a in trace.attempts]
        if trace.cloud is not None:
            return self._passed_through(trace, chain, attempts, delivered)
        price = costs(self.settings.reference_model, dep, trace.prompt_tokens, trace.completion_tokens, trace.generation_s,
                      delivered=delivered, usd_per_kwh=self.settings.electricity_usd_per_kwh,
                      default_watts=self.settings.default_power_watts)
        if dep is not None and not any(a["ok"] for a in attempts):
            attempts.append({"deployment": dep.id, "model": dep.model, "ok": trace.status == "success", "error_class": None})
        rejected = self._rejected_cost(trace)
        # savings count only an answer its checks did not fail; what a rejected answer cost is spent all the same
        saved = 0.0 if trace.verdict == "failed" else price.saved - rejected
        timings = trace.backend_timings or {}
        return {
            "request_id": trace.request_id, "created_at": trace.started_at, "alias": trace.alias,
            "endpoint": trace.endpoint, "stream": trace.stream, "status": trace.status,
            "served_by": dep.id if dep else None, "model": dep.model if dep else None,
            "backend": dep.provider if dep else None, "device": timings.get("device"),
            "attempts": attempts, "fallbacks": chain.index(dep.group) if dep and dep.group in chain else 0,
            "prompt_tokens": trace.prompt_tokens, "completion_tokens": trace.completion_tokens,
            "latency_s": trace.latency_s, "ttft_s": trace.ttft_s, "decode_tps": trace.decode_tps,
            "generation_s": trace.generation_s, "error_class": trace.error_class, "error": trace.error,
            "key_id": trace.key_id, "source": trace.source, "reference_model": self.settings.reference_model,
            "reference_cost": price.reference, "local_cost": price.local + rejected, "saved": saved,
            "requested_model": trace.requested_model, "cache_creation_tokens": None, "cache_read_tokens": None,
            "verdict": trace.verdict, "escalations": trace.escalations,
            "checks": [{"deployment": j.deployment_id, "model": j.model, "passed": j.passed, "check": j.check,
                        "reason": j.reason, "prompt_tokens": j.prompt_tokens, "completion_tokens": j.completion_tokens}
                       for j in trace.judged],
        }

    def _rejected_cost(self, trace: RequestTrace) -> float:
        """What the answers the checks rejected cost to make (every judged answer but the one the client got)."""
        total = 0.0
        for j in trace.judged[:-1]:
            price = costs(self.settings.reference_model, self.deployments.get(j.deployment_id or ""), j.prompt_tokens,
                          j.completion_tokens, j.generation_s, delivered=False,
                          usd_per_kwh=self.settings.electricity_usd_per_kwh, default_watts=self.settings.default_power_watts)
            total += price.local
        return total

    def _passed_through(self, trace: RequestTrace, chain: list[str], attempts: list[dict[str, Any]],
                        delivered: bool) -> dict[str, Any]:
        """A request Anthropic served (proxy/server/passthrough.py): Claude spend, priced from Anthropic's own usage
        fields. Its reference cost is what it cost (nothing was saved); a tier's fallback counts every group of
        the alias's chain as tried."""
        cloud = trace.cloud
        assert cloud is not None
        model = f"anthropic/{cloud.model}"
        try:
            cost = cloud_cost(cloud.model, trace.prompt_tokens, trace.completion_tokens, cloud.cache_creation_tokens,
                              cloud.cache_read_tokens) if delivered else 0.0
        except PricingError:
            cost = 0.0
        return {
            "request_id": trace.request_id, "created_at": trace.started_at, "alias": trace.alias,
            "endpoint": trace.endpoint, "stream": trace.stream, "status": trace.status,
            "served_by": PASSTHROUGH, "model": model, "backend": "anthropic", "device": None,
            "attempts": [*attempts, {"deployment": PASSTHROUGH, "model": model, "ok": trace.status == "success",
                                     "error_class": trace.error_class}],
            "fallbacks": len(chain) if cloud.fallback else 0,
            "prompt_tokens": trace.prompt_tokens, "completion_tokens": trace.completion_tokens,
            "latency_s": trace.latency_s, "ttft_s": trace.ttft_s, "decode_tps": trace.decode_tps,
            "generation_s": trace.latency_s, "error_class": trace.error_class, "error": trace.error,
            "key_id": trace.key_id, "source": trace.source, "reference_model": cloud.model,
            "reference_cost": cost, "local_cost": cost, "saved": 0.0,
            "requested_model": trace.requested_model, "cache_creation_tokens": cloud.cache_creation_tokens,
            "cache_read_tokens": cloud.cache_read_tokens, "verdict": None, "escalations": 0, "checks": [],
        }

    async def record(self, trace: RequestTrace) -> None:
        """The usage logger's sink: price the trace, settle an issued key's budget, and queue the row."""
        row = self.row(trace)
        self.pending.append(row)
        self._wake.set()
        if trace.hold is not None:
            await self._settle(trace.hold, row["reference_cost"])

    async def _settle(self, hold: Hold, cost: float) -> bool:
        try:
            await asyncio.to_thread(self.keys.settle, hold, cost)
            return True
        except Exception as e:  # noqa: BLE001 - the hold stays held meanwhile: the budget errs on the safe side
            log.error("could not settle the budget of %s (retrying): %s", hold.key_id, e)
            self.unsettled.append((hold, cost))
            return False

    # --- budget holds --------------------------------------------------------------------------------

    async def tend_holds(self) -> None:
        """Retry refused settlements, renew this process's holds, release the holds of processes that died."""
        await self._retry_settlements()
        try:
            await asyncio.to_thread(self.keys.renew)
            freed = await asyncio.to_thread(self.keys.reclaim_stale)
            drift = await asyncio.to_thread(self.keys.reconcile)
        except Exception as e:  # noqa: BLE001 - tried again in HOLD_RENEW_S
            log.error("budget holds could not be renewed or reconciled: %s", e)
            return
        if freed:
            log.warning("released %d budget holds ($%.4f) left by a process that stopped: keys %s", len(freed),
                        sum(h.amount for h in freed), ", ".join(sorted({h.key_id for h in freed})))
        for kid, was, now in drift:
            log.warning("the budget held on %s was $%.4f with $%.4f in hold rows: set to $%.4f", kid, was, now, now)

    async def _retry_settlements(self) -> None:
        retry, self.unsettled = self.unsettled, []
        for i, (hold, cost) in enumerate(retry):
            if not await self._settle(hold, cost):  # the store still refuses: keep the rest for the next try
                self.unsettled.extend(retry[i + 1:])
                return

    async def _keep_holds(self) -> None:
        while True:
            await asyncio.sleep(HOLD_RENEW_S)
            await self.tend_holds()

    # --- writing -----------------------------------------------------------------------------------

    def start(self) -> None:
        if self.spool.exists():
            try:
                lines = self.spool.read_text().splitlines()
                self.pending.extend(json.loads(line) for line in lines if line.strip())
                self.spool.unlink()
                log.info("%d usage rows from before the last shutdown queued for writing", len(lines))
            except (OSError, ValueError) as e:
                log.error("cannot read the pending usage rows in %s: %s", self.spool, e)
        self._task = asyncio.create_task(self._run())
        self._holds_task = asyncio.create_task(self._keep_holds())
        self._wake.set()

    async def _run(self) -> None:
        delay = 0.5
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self.pending:
                if await self._write_some():
                    delay = 0.5
                else:
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, RETRY_MAX_S)

    async def _write_some(self) -> bool:
        batch = self.pending[:BATCH]
        try:
            await asyncio.to_thread(self.store.insert, batch)
        except Exception as e:  # noqa: BLE001 - any failure keeps the rows for the next try
            if self.last_error is None:
                log.error("usage store write failed, %d rows kept for retry: %s", len(self.pending), e)
            self.last_error = f"usage store not writable: {e}"
            return False
        del self.pending[:len(batch)]
        if self.last_error is not None:
            log.info("usage store writable again")
        self.last_error = None
        return True

    async def flush(self, timeout: float = 10.0) -> None:
        """Write what is pending (at shutdown); give up after `timeout`, saying how many rows were left."""
        deadline = time.monotonic() + timeout
        while self.pending and time.monotonic() < deadline:
            if not await self._write_some():
                await asyncio.sleep(0.2)
        if self.pending:
            try:
                self.spool.parent.mkdir(parents=True, exist_ok=True)
                with self.spool.open("a") as f:
                    f.writelines(json.dumps(row) + "\n" for row in self.pending)
                log.error("%d usage rows could not be written (%s); kept in %s for the next start",
                          len(self.pending), self.last_error, self.spool)
                self.pending.clear()
            except OSError as e:
                log.error("%d usage rows lost: the store (%s) and %s both failed: %s",
                          len(self.pending), self.last_error, self.spool, e)

    async def stop(self) -> None:
        """After the usage logger is drained: write what is pending, then settle and release every hold."""
        for task in (self._task, self._holds_task):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        await self.flush()
        await self._retry_settlements()
        if self.unsettled:
            log.error("%d budget settlements ($%.4f) could not be written; their holds are released uncharged",
                      len(self.unsettled), sum(cost for _, cost in self.unsettled))
        try:
            # every request is closed and settled by now: a hold still here has no request left to settle it
            leftover = await asyncio.to_thread(self.keys.release_own)
        except Exception as e:  # noqa: BLE001 - they go stale and the next start (or another replica) releases them
            log.error("budget holds could not be released at shutdown: %s", e)
            return
        if leftover:
            log.warning("released %d budget holds no request settled", len(leftover))

    def problem(self) -> str | None:
        if self.last_error:
            return f"{self.last_error} ({len(self.pending)} rows waiting)"
        return None
