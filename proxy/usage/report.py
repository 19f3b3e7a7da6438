"""The savings report: "Claude would have cost $X, local cost $Y, saved Z%", from the usage rows.

It carries what the old `llm_metrics.py --days 7` printed (calls, tokens in and out, average latency,
the three money lines) plus success and fallback rates and a breakdown by task, model, day, key, source or Claude
tier, with what the answer checks said (savings count only answers that passed), the escalations and their
cost, and how often `auto` chose each alias. Requests passed through to Anthropic (the Messages API) are Claude
spend, counted apart from the delegated work: "Claude spend through Delegate $A; delegated work Claude would
have cost $B, ran locally for $C; saved B-C, which is N% of A+B".
Costs were priced when each row was written (proxy/usage/pricing.py), so this module only adds them up and
must not import litellm: `delegate report` answers at once.
"""

from __future__ import annotations

import csv
import io
import json
import re
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from proxy.usage.store import PASSTHROUGH

GROUPINGS = {"task": "alias", "model": "model", "day": "day", "key": "key_id", "source": "source",
             "tier": "requested_model"}
_TIER = re.compile(r"^claude-(?:[\d.-]+-)?(haiku|sonnet|opus)")


def passed_through(row: dict[str, Any]) -> bool:
    """A request Anthropic served (Claude spend through Delegate), not delegated work."""
    return row.get("served_by") == PASSTHROUGH


def tier(model: str | None) -> str:
    """The Claude tier a Messages API request named (`claude-haiku-4-5` -> haiku); rows that named none say so."""
    m = _TIER.match(model or "")
    return m.group(1) if m else "(no Claude tier)"


@dataclass
class Totals:
    calls: int = 0
    successes: int = 0
    fell_back: int = 0
    tokens_in: int = 0
    tokens_out: int = 0
    latency_s: float = 0.0
    reference_cost: float = 0.0  # delegated work: what Claude would have charged for it
    local_cost: float = 0.0  # delegated work: what it cost here
    claude_calls: int = 0  # requests passed through to Anthropic (a Claude model, or a tier's fallback)
    claude_spend: float = 0.0  # what they cost at Anthropic
    checked: int = 0  # answers an alias's checks judged (proxy/routing/answer_checks.py)
    failed_checks: int = 0  # ...that the client got marked failed: their cost counts, their savings do not
    escalated: int = 0  # requests sent on because an answer failed its checks
    escalation_cost: float = 0.0  # what those requests cost in all
    auto_chosen: int = 0  # requests whose alias `model="auto"` chose
    reference_models: set[str] = field(default_factory=set)

    def add(self, row: dict[str, Any]) -> None:
        self.calls += 1
        self.successes += row["status"] == "success"
        self.fell_back += (row["fallbacks"] or 0) > 0
        self.tokens_in += row["prompt_tokens"] or 0
        self.tokens_out += row["completion_tokens"] or 0
        self.latency_s += row["latency_s"] or 0.0
        if passed_through(row):
            self.claude_calls += 1
            self.claude_spend += row["local_cost"] or 0.0
            return
        self.auto_chosen += row.get("requested_model") == "auto"
        verdict = row.get("verdict")
        self.checked += verdict is not None
        self.failed_checks += verdict == "failed"
        if row.get("escalations"):
            self.escalated += 1
            self.escalation_cost += row["local_cost"] or 0.0
        # savings count only answers that passed their checks (or had none); what a failed one cost was spent
        if verdict != "failed":
            self.reference_cost += row["reference_cost"] or 0.0
        self.local_cost += row["local_cost"] or 0.0
        self.reference_models.add(row["reference_model"])

    @property
    def saved(self) -> float:
        return self.reference_cost - self.local_cost

    @property
    def saved_pct(self) -> float | None:
        return 100.0 * self.saved / self.reference_cost if self.reference_cost > 0 else None

    @property
    def saved_share_pct(self) -> float | None:
        """What was saved as a share of all Claude spend, what passed through plus what the delegated work would
        have cost: "saved B-C, which is N% of A+B"."""
        whole = self.claude_spend + self.reference_cost
        return 100.0 * self.saved / whole if whole > 0 else None

    @property
    def avg_latency_s(self) -> float | None:
        return self.latency_s / self.calls if self.calls else None

    @property
    def success_rate(self) -> float | None:
        return self.successes / self.calls if self.calls else None

    @property
    def fallback_rate(self) -> float | None:
        return self.fell_back / self.calls if self.calls else None

    def as_dict(self) -> dict[str, Any]:
        out = {k: v for k, v in asdict(self).items() if k != "reference_models"}
        out.update(saved=self.saved, saved_pct=self.saved_pct, saved_share_pct=self.saved_share_pct,
                   avg_latency_s=self.avg_latency_s,
                   success_rate=self.success_rate, fallback_rate=self.fallback_rate,
                   reference_models=sorted(self.reference_models))
        return out


@dataclass
class Report:
    since: datetime | None
    until: datetime
    by: str
    total: Totals
    groups: dict[str, Totals]

    @property
    def empty(self) -> bool:
        return self.total.calls == 0

    def as_dict(self) -> dict[str, Any]:
        return {"since": self.since.isoformat() if self.since else None, "until": self.until.isoformat(), "by": self.by,
                "total": self.total.as_dict(), "groups": {k: v.as_dict() for k, v in self.groups.items()}}


def _group_key(row: dict[str, Any], by: str) -> str:
    if by == "day":
        return datetime.fromtimestamp(row["created_at"], UTC).strftime("%Y-%m-%d")
    value = row.get(GROUPINGS[by])
    if by == "model" and value is None:
        return "(none answered)"
    if by == "source" and value is None:
        return "api"  # rows written before sources were recorded came through the API
    if by == "tier":
        return tier(value)
    return str(value) if value is not None else "(none)"


def build(rows: Iterable[dict[str, Any]], since: datetime | None, until: datetime, by: str = "task") -> Report:
    if by not in GROUPINGS:
        raise ValueError(f"--by must be one of {', '.join(GROUPINGS)}")
    total, groups = Totals(), dict[str, Totals]()
    for row in rows:
        total.add(row)
        groups.setdefault(_group_key(row, by), Totals()).add(row)
    return Report(since, until, by, total, dict(sorted(groups.items())))


# --- output ------------------------------------------------------------------------------------------

def money(x: float) -> str:
    return f"${x:,.4f}"


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.0f}%"


def period_text(report: Report) -> str:
    if report.since is None:
        return "all time"
    days = (report.until - report.since).total_seconds() / 86400
    return f"last {days:.0f} days" if abs(days - round(days)) < 1e-6 else f"since {report.since:%Y-%m-%d %H:%M} UTC"


def render_table(report: Report) -> str:
    """The old report's lines, then the breakdown as a table (rich, sized to the terminal)."""
    from rich.console import Console
    from rich.table import Table

    buf = io.StringIO()
    console = Console(file=buf, width=110, highlight=False, soft_wrap=False)
    t = report.total
    if report.empty:
        console.print(f"No usage yet ({period_text(report)}): send a request through the proxy, then run this again.")
        return buf.getvalue()
    reference = ", ".join(sorted(t.reference_models))
    console.print(f"📊 Delegate usage, {period_text(report)}")
    console.print(f"   Total calls: {t.calls:,}")
    console.print(f"   Tokens: {t.tokens_in:,} in, {t.tokens_out:,} out")
    console.print(f"   Avg latency: {t.avg_latency_s:.1f}s")
    console.print(f"   Success rate: {_pct(t.success_rate)}   Fallback rate: {_pct(t.fallback_rate)}")
    console.print()
    for line in [*money_lines(t, reference), *check_lines(t)]:
        console.print(line)
    console.print()
    spend = t.claude_calls > 0  # a column for what passed through, when anything did
    escalated, auto = t.escalated > 0, t.auto_chosen > 0
    table = Table(title=f"By {report.by}", title_justify="left")
    for name in (report.by, "calls", "tokens in", "tokens out", "avg latency", "success", "fallback",
                 *(["escalated"] if escalated else []), *(["auto"] if auto else []),
                 *(["Claude spend"] if spend else []), "Claude would cost", "local cost", "saved"):
        table.add_column(name, justify="left" if name == report.by else "right")
    for key, g in report.groups.items():
        table.add_row(key, f"{g.calls:,}", f"{g.tokens_in:,}", f"{g.tokens_out:,}", f"{g.avg_latency_s:.1f}s",
                      _pct(g.success_rate), _pct(g.fallback_rate),
                      *([f"{g.escalated:,}"] if escalated else []),
                      *([f"{g.auto_chosen:,}"] if auto else []), *([money(g.claude_spend)] if spend else []),
                      money(g.reference_cost), money(g.local_cost), money(g.saved))
    console.print(table)
    if escalated:
        console.print("   Escalations and their cost: " + ", ".join(
            f"{key} {g.escalated:,} ({money(g.escalation_cost)})" for key, g in report.groups.items() if g.escalated))
    return buf.getvalue()


def money_lines(t: Totals, reference: str) -> list[str]:
    """The money, in words. With Claude spend through Delegate (Anthropic's Messages API passed through): "Claude
    spend through Delegate $A; delegated work Claude would have cost $B, ran locally for $C; saved B-C, which is
    N% of A+B"."""
    if not t.claude_calls:
        saved_pct = f" ({t.saved_pct:.0f}%)" if t.saved_pct is not None else ""
        return [f"💰 Savings estimate (reference: {reference})", f"   Claude would cost: {money(t.reference_cost)}",
                f"   Local cost: {money(t.local_cost)}", f"   Saved: {money(t.saved)}{saved_pct}"]
    share = f", which is {t.saved_share_pct:.0f}% of {money(t.claude_spend + t.reference_cost)}" \
        if t.saved_share_pct is not None else ""
    return [f"💰 Claude spend and savings (reference for delegated work: {reference or '-'})",
            f"   Claude spend through Delegate: {money(t.claude_spend)} ({t.claude_calls:,} requests passed through)",
            f"   Delegated work Claude would have cost: {money(t.reference_cost)}, ran locally for {money(t.local_cost)}",
            f"   Saved: {money(t.saved)}{share}"]


def check_lines(t: Totals) -> list[str]:
    """What the answer checks said, when any answer was checked, and how often `auto` chose the alias."""
    lines = []
    if t.checked:
        lines.append(f"   Checked answers: {t.checked:,}, {t.failed_checks:,} failed (their savings not counted); "
                     f"escalated {t.escalated:,} requests, costing {money(t.escalation_cost)}")
    if t.auto_chosen:
        lines.append(f"   Alias chosen by auto: {t.auto_chosen:,} requests")
    return lines


def render_json(report: Report) -> str:
    return json.dumps(report.as_dict(), indent=2)


def render_csv(report: Report) -> str:
    buf = io.StringIO()
    fields = ["group", "calls", "successes", "fell_back", "tokens_in", "tokens_out", "avg_latency_s", "success_rate",
              "fallback_rate", "checked", "failed_checks", "escalated", "escalation_cost", "auto_chosen", "claude_spend",
              "reference_cost", "local_cost", "saved", "saved_pct", "saved_share_pct"]
    writer = csv.DictWriter(buf, fieldnames=fields, extrasaction="ignore")
    writer.writeheader()
    for key, g in [*report.groups.items(), ("TOTAL", report.total)]:
        writer.writerow({"group": key, **g.as_dict()})
    return buf.getvalue()


def old_model_name(model: str | None) -> str:
    """`ollama_chat/llama3.2:3b` -> `llama3.2:3b`, the name the old metrics file used."""
    return (model or "").split("/", 1)[-1]


def export_jsonl(rows: Iterable[dict[str, Any]], path: Path) -> int:
    """Write rows in the old local-llm-usage.jsonl format; returns how many."""
    n = 0
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            stamp = datetime.fromtimestamp(row["created_at"], UTC)
            f.write(json.dumps({
                "timestamp": stamp.strftime("%Y-%m-%dT%H:%M:%S.") + f"{stamp.microsecond // 1000:03d}Z",
                "task_type": row["alias"], "model": old_model_name(row["model"]),
                "latency_sec": round(row["latency_s"], 2), "tokens_in": row["prompt_tokens"],
                "tokens_out": row["completion_tokens"], "success": row["status"] == "success",
            }) + "\n")
            n += 1
    return n
