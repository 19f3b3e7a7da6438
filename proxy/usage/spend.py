"""LiteLLM-compatible spend endpoints, from our own store (no Postgres needed), plus what was saved.

GET /spend/logs            rows in LiteLLM's SpendLogs shape, with our `saved` and `reference_cost`
GET /global/spend/report   spend per day, grouped by api_key, model, task or Claude tier
A request passed through to Anthropic (the Messages API) is spend too, and its `total_claude_spend`; it saved nothing.
An answer that failed its alias's checks saved nothing either; each group says how many failed, escalated (and at
what cost) and were routed by `model="auto"`.
Both take the master key when one is set; without one, only clients on this machine and never an issued
key (auth.py's check_admin).
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from proxy.server.errors import bad_request
from proxy.server.responses import json_response
from proxy.usage.keys import key_id
from proxy.usage.report import passed_through, tier
from proxy.usage.store import UsageStore


def parse_date(value: str | None, name: str, end: bool = False) -> float | None:
    """`2026-11-25` (a whole day; an end date includes it) or an ISO timestamp -> unix seconds."""
    if not value:
        return None
    try:
        if len(value) == 10:
            day = datetime.strptime(value, "%Y-%m-%d").replace(tzinfo=UTC)
            return (day + timedelta(days=1 if end else 0)).timestamp()
        stamp = datetime.fromisoformat(value.replace("Z", "+00:00"))
        return (stamp if stamp.tzinfo else stamp.replace(tzinfo=UTC)).timestamp()
    except ValueError as e:
        raise bad_request(f"'{name}' must be a date like 2026-11-25 or an ISO timestamp", param=name) from e


def _iso(t: float | None) -> str | None:
    return datetime.fromtimestamp(t, UTC).isoformat() if t is not None else None


CALL_TYPES = {"chat": "acompletion", "text": "atext_completion", "messages": "anthropic_messages"}


def spend_log(row: dict[str, Any]) -> dict[str, Any]:
    start = row["created_at"]
    return {
        "request_id": row["request_id"],
        "call_type": CALL_TYPES.get(row["endpoint"], "atext_completion"),
        "api_key": row["key_id"] or "",
        "spend": row["local_cost"],
        "total_tokens": row["prompt_tokens"] + row["completion_tokens"],
        "prompt_tokens": row["prompt_tokens"],
        "completion_tokens": row["completion_tokens"],
        "startTime": _iso(start),
        "endTime": _iso(start + row["latency_s"]),
        "completionStartTime": _iso(start + row["ttft_s"]) if row["ttft_s"] is not None else None,
        "model": row["model"] or "",
        "model_id": row["served_by"] or "",
        "model_group": row["alias"],
        "custom_llm_provider": row["backend"] or "",
        "api_base": "",
        "user": "",
        "metadata": {"status": row["status"], "attempts": row["attempts"], "fallbacks": row["fallbacks"],
                     "error_class": row["error_class"], "error": row["error"], "stream": row["stream"],
                     "decode_tps": row["decode_tps"], "device": row["device"], "source": row.get("source") or "api",
                     # Anthropic's Messages API: the model asked for, and what Anthropic served and cached
                     "requested_model": row.get("requested_model"), "passed_through": passed_through(row),
                     "cache_creation_input_tokens": row.get("cache_creation_tokens"),
                     "cache_read_input_tokens": row.get("cache_read_tokens"),
                     # answer checks: the verdict on what the client got, the escalations, each judged answer
                     "verdict": row.get("verdict"), "escalations": row.get("escalations") or 0,
                     "checks": row.get("checks") or [], "auto": row.get("requested_model") == "auto"},
        "cache_hit": "False",
        "cache_key": "",
        "request_tags": [],
        "team_id": None,
        "end_user": "",
        "requester_ip_address": None,
        "status": "success" if row["status"] == "success" else "failure",
        "reference_model": row["reference_model"],
        "reference_cost": row["reference_cost"],
        "saved": row["saved"],
    }


class SpendAPI:
    def __init__(self, store: UsageStore, check_key: Callable[[Request], Awaitable[object]]) -> None:
        self.store, self.check_key = store, check_key

    async def logs(self, request: Request) -> Response:
        await self.check_key(request)
        q = request.query_params
        api_key = q.get("api_key")
        rows = await asyncio.to_thread(
            self.store.rows, since=parse_date(q.get("start_date"), "start_date"),
            until=parse_date(q.get("end_date"), "end_date", end=True), request_id=q.get("request_id") or None,
            key_id=(api_key if api_key.startswith("key_") else key_id(api_key)) if api_key else None)
        return json_response([spend_log(r) for r in rows])

    async def report(self, request: Request) -> Response:
        await self.check_key(request)
        q = request.query_params
        group_by = q.get("group_by") or "api_key"
        field = {"api_key": "key_id", "model": "model", "task": "alias", "alias": "alias", "team": "alias",
                 "tier": "requested_model"}.get(group_by)
        if field is None:
            raise bad_request("'group_by' must be one of api_key, model, task, tier", param="group_by")
        rows = await asyncio.to_thread(self.store.rows, since=parse_date(q.get("start_date"), "start_date"),
                                       until=parse_date(q.get("end_date"), "end_date", end=True))
        days: dict[str, dict[str, list[dict[str, Any]]]] = defaultdict(lambda: defaultdict(list))
        for r in rows:
            name = tier(r[field]) if group_by == "tier" else str(r[field] or "")
            days[datetime.fromtimestamp(r["created_at"], UTC).strftime("%Y-%m-%d")][name].append(r)
        out = []
        for day, groups in sorted(days.items()):
            entries = []
            for name, members in sorted(groups.items()):
                per_model: dict[str, dict[str, float]] = defaultdict(lambda: {"spend": 0.0, "total_tokens": 0, "saved": 0.0})
                for r in members:
                    m = per_model[r["model"] or ""]
                    m["spend"] += r["local_cost"]
                    m["saved"] += r["saved"]
                    m["total_tokens"] += r["prompt_tokens"] + r["completion_tokens"]
                escalated = [r for r in members if r.get("escalations")]
                entries.append({group_by: name, "total_spend": sum(r["local_cost"] for r in members),
                                # delegated work that passed its checks (or had none): what Claude would have cost
                                "total_reference_cost": sum(r["reference_cost"] for r in members
                                                            if not passed_through(r) and r.get("verdict") != "failed"),
                                "total_claude_spend": sum(r["local_cost"] for r in members if passed_through(r)),
                                "total_saved": sum(r["saved"] for r in members), "requests": len(members),
                                "failed_checks": sum(r.get("verdict") == "failed" for r in members),
                                "escalations": len(escalated),
                                "total_escalation_cost": sum(r["local_cost"] for r in escalated),
                                "auto_chosen": sum(r.get("requested_model") == "auto" for r in members),
                                "metadata": [{"model": k, **v} for k, v in sorted(per_model.items())]})
            out.append({"group_by_day": day, f"{group_by}s": entries})
        return json_response(out)
