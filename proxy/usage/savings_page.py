"""The savings page at /ui: saved dollars over time, per task, and the latest requests, refreshing itself.

The page (savings_page.html) is static and holds no data; it draws its chart from /ui/data with its own few lines
of script, so it works on a machine with no internet. With a master key set, the page shows a sign-in form:
it POSTs the key to /ui/login as JSON, which answers with an HttpOnly, SameSite=Strict cookie for Path=/ui
holding a session token (an HMAC under the master key with an expiry, never the key itself: auth.py); the
page's data requests carry that cookie. Scripts may send `Authorization: Bearer <master key>` to /ui/data
instead. The key never goes in the address: `?key=` would leave it in access logs and the browser's history,
and is refused with a message saying so. Without a master key the page answers on this machine only, with
no sign-in.
"""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from starlette.requests import Request
from starlette.responses import HTMLResponse, Response

from proxy.server.auth import SESSION_COOKIE, SESSION_S, Auth, check_json_body
from proxy.server.errors import ProxyError, bad_request, unauthorized
from proxy.server.responses import json_response
from proxy.server.validation import parse_json
from proxy.usage import report
from proxy.usage.store import UsageStore

PAGE = (Path(__file__).parent / "savings_page.html").read_text(encoding="utf-8")
RECENT = 20
LOGIN_MAX_BYTES = 4096


def page_data(rows: list[dict[str, Any]], days: int, reference_model: str, now: float) -> dict[str, Any]:
    since = datetime.fromtimestamp(now, UTC) - timedelta(days=days)
    by_task = report.build(rows, since, datetime.fromtimestamp(now, UTC), by="task")
    by_source = report.build(rows, since, datetime.fromtimestamp(now, UTC), by="source")
    by_tier = report.build(rows, since, datetime.fromtimestamp(now, UTC), by="tier")
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
            "by_source": {k: v.as_dict() for k, v in by_source.groups.items()},
            "by_tier": {k: v.as_dict() for k, v in by_tier.groups.items()},
            "recent": [{k: r[k] for k in ("request_id", "created_at", "alias", "model", "status", "prompt_tokens",
                                          "completion_tokens", "latency_s", "saved", "verdict", "escalations")}
                       for r in recent]}


def _no_key_in_url(request: Request) -> None:
    if "key" in request.query_params:
        raise bad_request("the key does not go in the address (it would stay in access logs and the browser's "
                          "history): open /ui and sign in with the form, or send 'Authorization: Bearer <key>' to "
                          "/ui/data", param="key", code="key_in_url")


class SavingsPage:
    def __init__(self, store: UsageStore, reference_model: str, auth: Auth) -> None:
        self.store, self.reference_model, self.auth = store, reference_model, auth

    async def page(self, request: Request) -> Response:
        _no_key_in_url(request)
        return HTMLResponse(PAGE, headers={"Cache-Control": "no-store", "X-Frame-Options": "DENY",
                                           "Referrer-Policy": "no-referrer"})

    async def data(self, request: Request) -> Response:
        _no_key_in_url(request)
        caller = await self.auth.check_admin(request, session=True)
        raw = request.query_params.get("days", "30")
        if not raw.isdigit() or not 1 <= int(raw) <= 3660:
            raise bad_request("'days' must be a whole number from 1 to 3660", param="days")
        days, now = int(raw), time.time()
        rows = await asyncio.to_thread(self.store.rows, since=now - days * 86400)
        data = page_data(rows, days, self.reference_model, now)
        data["signed_in"] = caller.master and caller.key_id is None  # by the sign-in cookie, so the page offers to sign out
        return json_response(data, headers={"Cache-Control": "no-store"})

    async def login(self, request: Request) -> Response:
        """POST {"key": "<master key>"} as JSON -> the session cookie. JSON only, so no other site's form can
        sign a browser in (login CSRF)."""
        check_json_body(request)
        if not self.auth.has_master:
            raise bad_request("no master key is set: the savings page needs no sign-in, and answers on this machine only")
        raw = b""
        async for chunk in request.stream():
            raw += chunk
            if len(raw) > LOGIN_MAX_BYTES:
                raise ProxyError(413, f"a sign-in body is at most {LOGIN_MAX_BYTES} bytes", code="request_too_large")
        key = parse_json(raw).get("key")
        if not isinstance(key, str) or not key:
            raise bad_request("send the master key as {\"key\": \"...\"}", param="key")
        if not self.auth.is_master(key):
            await self.auth.refuse_issued(key)
            raise unauthorized("that is not the master key")
        response = json_response({"signed_in": True, "expires_in": SESSION_S}, headers={"Cache-Control": "no-store"})
        response.set_cookie(SESSION_COOKIE, self.auth.session_token(), max_age=SESSION_S, path="/ui", httponly=True,
                            samesite="strict", secure=request.url.scheme == "https")
        return response

    async def logout(self, request: Request) -> Response:
        response = json_response({"signed_in": False})
        response.delete_cookie(SESSION_COOKIE, path="/ui", httponly=True, samesite="strict",
                               secure=request.url.scheme == "https")
        return response
