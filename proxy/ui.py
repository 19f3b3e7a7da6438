"""The savings page at /ui: saved dollars over time, per task, and the latest requests, refreshing itself.

The page (ui.html) is static and holds no data; it draws its chart from /ui/data with its own few lines
of script, so it works on a machine with no internet. With a master key set, open /ui?key=<key>: the
page sends the key with its data requests.
"""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from starlette.requests import Request
from starlette.responses import HTMLResponse, Response

from proxy import report
from proxy.errors import bad_request
from proxy.responses import json_response
from proxy.store import UsageStore

PAGE = (Path(__file__).parent / "ui.html").read_text(encoding="utf-8")
RECENT = 20


def page_data(rows: list[dict[str, Any]], days: int, reference_model: str, now: float) -> dict[str, Any]:
    since = datetime.fromtimestamp(now, UTC) - timedelta(days=days)
    by_task = report.build(rows, since, datetime.fromtimestamp(now, UTC), by="task")
    by_day = report.build(rows, since, datetime.fromtimestamp(now, UTC), by="day").groups
    first = since.date() + timedelta(days=1)
    series = []
    for i in range(days):  # every day in the window, zero where nothing ran, so the chart's x axis is time
        day = (first + timedelta(days=i)).isoformat()
        g = by_day.get(day)
        series.append({"day": day, "calls": g.calls if g else 0, "reference_cost": g.reference_cost if g else 0.0,
                       "local_cost": g.local_cost if g else 0.0, "saved": g.saved if g else 0.0})
    recent = sorted(rows, key=lambda r: r["created_at"], reverse=True)[:RECENT]
    return {"days": days, "reference_model": reference_model, "total": by_task.total.as_dict(),
            "by_task": {k: v.as_dict() for k, v in by_task.groups.items()}, "by_day": series,
            "recent": [{k: r[k] for k in ("request_id", "created_at", "alias", "model", "status", "prompt_tokens",
                                          "completion_tokens", "latency_s", "saved")} for r in recent]}


class SavingsPage:
    def __init__(self, store: UsageStore, reference_model: str, check_key: Any) -> None:
        self.store, self.reference_model, self.check_key = store, reference_model, check_key

    async def page(self, request: Request) -> Response:
        return HTMLResponse(PAGE)

    async def data(self, request: Request) -> Response:
        self.check_key(request)
        raw = request.query_params.get("days", "30")
        if not raw.isdigit() or not 1 <= int(raw) <= 3660:
            raise bad_request("'days' must be a whole number from 1 to 3660", param="days")
        days, now = int(raw), time.time()
        rows = await asyncio.to_thread(self.store.rows, since=now - days * 86400)
        return json_response(page_data(rows, days, self.reference_model, now))
