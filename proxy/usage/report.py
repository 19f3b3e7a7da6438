"""The savings report: "Claude would have cost $X, local cost $Y, saved Z%", from the usage rows.

It carries what the old `llm_metrics.py --days 7` printed (calls, tokens in and out, average latency,
the three money lines) plus success and fallback rates and a breakdown by task, model, day or key.
Costs were priced when each row was written (proxy/usage/pricing.py), so this module only adds them up and
must not import litellm: `delegate report` answers at once.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

GROUPINGS = {"task": "alias", "model": "model", "day": "day", "key": "key_id", "source": "source"}


@dataclass
class Totals:
    calls: int = 0
    successes: int = 0
    fell_back: int = 0
    tokens_in: int = 0
    tokens_out: int = 0
    latency_s: float = 0.0
    reference_cost: float = 0.0
    local_cost: float = 0.0
    reference_models: set[str] = field(default_factory=set)

    def add(self, row: dict[str, Any]) -> None:
        self.calls += 1
        self.successes += row["status"] == "success"
        self.fell_back += (row["fallbacks"] or 0) > 0
        self.tokens_in += row["prompt_tokens"] or 0
        self.tokens_out += row["completion_tokens"] or 0
        self.latency_s += row["latency_s"] or 0.0
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
        out.update(saved=self.saved, saved_pct=self.saved_pct, avg_latency_s=self.avg_latency_s,
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
    console.print(f"💰 Savings estimate (reference: {reference})")
    console.print(f"   Claude would cost: {money(t.reference_cost)}")
    console.print(f"   Local cost: {money(t.local_cost)}")
    saved_pct = f" ({t.saved_pct:.0f}%)" if t.saved_pct is not None else ""
    console.print(f"   Saved: {money(t.saved)}{saved_pct}")
    console.print()
    table = Table(title=f"By {report.by}", title_justify="left")
    for name in (report.by, "calls", "tokens in", "tokens out", "avg latency", "success", "fallback",
                 "Claude would cost", "local cost", "saved"):
        table.add_column(name, justify="left" if name == report.by else "right")
    for key, g in report.groups.items():
        table.add_row(key, f"{g.calls:,}", f"{g.tokens_in:,}", f"{g.tokens_out:,}", f"{g.avg_latency_s:.1f}s",
                      _pct(g.success_rate), _pct(g.fallback_rate), money(g.reference_cost), money(g.local_cost),
                      money(g.saved))
    console.print(table)
    return buf.getvalue()


def render_json(report: Report) -> str:
    return json.dumps(report.as_dict(), indent=2)


def render_csv(report: Report) -> str:
    buf = io.StringIO()
    fields = ["group", "calls", "successes", "fell_back", "tokens_in", "tokens_out", "avg_latency_s", "success_rate",
              "fallback_rate", "reference_cost", "local_cost", "saved", "saved_pct"]
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
