"""The savings report and the store under it: numbers, formats, the old JSONL export, migrations."""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from proxy.usage import report, store
from proxy.usage.store import UsageStore
from tests.servers import ROOT

NOW = time.time()


def row(i: int, **over) -> dict:  # type: ignore[no-untyped-def]
    base = {"request_id": f"req_{i}", "created_at": NOW - 3600 * i, "alias": "coding", "endpoint": "chat", "stream": False,
            "status": "success", "served_by": "coding#0", "model": "ollama_chat/qwen2.5-coder:7b", "backend": "ollama_chat",
            "device": None, "attempts": [], "fallbacks": 0, "prompt_tokens": 1000, "completion_tokens": 200, "latency_s": 2.0,
            "ttft_s": 0.5, "decode_tps": 20.0, "generation_s": 2.0, "error_class": None, "error": None, "key_id": "key_a",
            "reference_model": "claude-sonnet-4-5", "reference_cost": 0.006, "local_cost": 0.0001, "saved": 0.0059}
    return {**base, **over}


ROWS = [row(0), row(1, alias="quick", model="tinygrad/smollm2", fallbacks=1, latency_s=4.0, key_id="key_b"),
        row(2, status="error", model=None, served_by=None, reference_cost=0.0, local_cost=0.0, saved=0.0,
            prompt_tokens=0, completion_tokens=0, latency_s=0.1)]


def test_totals_and_rates() -> None:
    r = report.build(ROWS, None, datetime.now(UTC))
    t = r.total
    assert (t.calls, t.tokens_in, t.tokens_out, t.successes, t.fell_back) == (3, 2000, 400, 2, 1)
    assert t.reference_cost == pytest.approx(0.012) and t.local_cost == pytest.approx(0.0002)
    assert t.saved == pytest.approx(0.0118) and t.saved_pct == pytest.approx(98.333, rel=1e-3)
    assert t.success_rate == pytest.approx(2 / 3) and t.fallback_rate == pytest.approx(1 / 3)
    assert t.avg_latency_s == pytest.approx(6.1 / 3)
    assert list(r.groups) == ["coding", "quick"]


@pytest.mark.parametrize(("by", "keys"), [("task", ["coding", "quick"]), ("key", ["key_a", "key_b"]),
                                          ("model", ["(none answered)", "ollama_chat/qwen2.5-coder:7b", "tinygrad/smollm2"]),
                                          ("source", ["api"])])  # rows from before sources were recorded
def test_breakdowns(by: str, keys: list[str]) -> None:
    assert list(report.build(ROWS, None, datetime.now(UTC), by=by).groups) == keys


def test_table_carries_the_old_report_lines() -> None:
    text = report.render_table(report.build(ROWS, datetime.now(UTC) - timedelta(days=7), datetime.now(UTC)))
    for line in ("Total calls: 3", "Tokens: 2,000 in, 400 out", "Avg latency: 2.0s", "Claude would cost: $0.0120",
                 "Local cost: $0.0002", "Saved: $0.0118 (98%)", "Success rate: 67%", "Fallback rate: 33%", "last 7 days"):
        assert line in text
    assert "quick" in text and "coding" in text


def test_empty_store_says_no_usage_yet() -> None:
    text = report.render_table(report.build([], None, datetime.now(UTC)))
    assert "No usage yet" in text
    assert json.loads(report.render_json(report.build([], None, datetime.now(UTC))))["total"]["saved_pct"] is None


def test_csv_and_json() -> None:
    r = report.build(ROWS, None, datetime.now(UTC))
    lines = list(csv.DictReader(io.StringIO(report.render_csv(r))))
    assert [x["group"] for x in lines] == ["coding", "quick", "TOTAL"]
    assert json.loads(report.render_json(r))["total"]["calls"] == 3


def test_export_in_the_old_jsonl_format(tmp_path: Path) -> None:
    path = tmp_path / "local-llm-usage.jsonl"
    assert report.export_jsonl(ROWS, path) == 3
    first = json.loads(path.read_text().splitlines()[0])
    assert set(first) == {"timestamp", "task_type", "model", "latency_sec", "tokens_in", "tokens_out", "success"}
    assert first["model"] == "qwen2.5-coder:7b" and first["task_type"] == "coding" and first["success"] is True
    assert first["timestamp"].endswith("Z") and len(first["timestamp"]) == len("2026-01-30T16:12:32.132Z")


def test_store_keeps_one_row_per_request_id() -> None:
    s = UsageStore.open()
    s.insert(ROWS)
    s.insert(ROWS[:2])  # a retried batch
    assert s.count() == 3
    assert s.rows(request_id="req_1")[0]["alias"] == "quick"
    assert [r["request_id"] for r in s.rows(key_id="key_a")] == ["req_2", "req_0"]
    assert len(s.rows(since=NOW - 1.5 * 3600)) == 2


def test_sql_is_parameterized() -> None:
    s = UsageStore.open()
    s.insert([row(0, request_id="x'); DROP TABLE usage; --", key_id="' OR '1'='1")])
    assert s.rows(key_id="' OR '1'='1")[0]["request_id"] == "x'); DROP TABLE usage; --"
    assert s.rows(key_id="nobody' OR '1'='1") == []
    assert s.count() == 1


def test_migrations_apply_once_and_upgrade(monkeypatch: pytest.MonkeyPatch) -> None:
    db = store.connect()
    version = len(store.MIGRATIONS)
    assert store.migrate(db) == version
    assert store.migrate(db) == version  # nothing applied twice
    added = []

    def m002_example(db: store.Database) -> None:
        added.append(1)
        db.execute("ALTER TABLE usage ADD COLUMN note TEXT")

    monkeypatch.setattr(store, "MIGRATIONS", [*store.MIGRATIONS, m002_example])
    assert store.migrate(db) == version + 1 and store.migrate(db) == version + 1
    assert added == [1]
    names = [r[0] for r in db.execute("SELECT name FROM _migrations ORDER BY version")]
    assert names == [m.__name__ for m in store.MIGRATIONS]


def test_store_uses_wal_under_delegate_home(delegate_home: Path) -> None:
    UsageStore.open()
    assert (delegate_home / "usage.db").exists()
    assert store.connect().execute("PRAGMA journal_mode")[0][0] == "wal"


def test_report_cli(delegate_home: Path, tmp_path: Path) -> None:
    UsageStore.open().insert(ROWS)

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "proxy.client.cli", "report", *args], cwd=ROOT, capture_output=True,
                              text=True, timeout=60, env={"DELEGATE_HOME": str(delegate_home), "PATH": "/usr/bin"})

    table = run("--days", "7")
    assert table.returncode == 0 and "Saved: $0.0118 (98%)" in table.stdout
    assert json.loads(run("--format", "json", "--by", "model").stdout)["by"] == "model"
    assert run("--format", "csv").stdout.startswith("group,calls")
    out = tmp_path / "old.jsonl"
    assert run("--export-jsonl", str(out)).returncode == 0 and len(out.read_text().splitlines()) == 3
    bad = run("--since", "last tuesday")
    assert bad.returncode != 0 and bad.stderr.startswith("error:")


def test_report_cli_does_not_import_litellm() -> None:
    code = ("import sys; from proxy.client.cli import main; main(['report', '--days', '1']); "
            "assert 'litellm' not in sys.modules, 'litellm imported'")
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, timeout=60).returncode == 0


def test_savings_count_only_answers_that_passed_and_escalations_show_what_they_cost() -> None:
    rows = [row(0, verdict="passed"),
            row(1, verdict="failed", saved=0.0),  # its cost was spent; Claude's price for it is not a saving
            row(2, verdict="passed", escalations=1, local_cost=0.002, saved=0.004, requested_model="auto"),
            row(3, alias="quick", requested_model="auto")]
    r = report.build(rows, None, datetime.now(UTC))
    t = r.total
    assert (t.checked, t.failed_checks, t.escalated, t.auto_chosen) == (3, 1, 1, 2)
    assert t.reference_cost == pytest.approx(0.018)  # three answers counted, the failed one not
    assert t.local_cost == pytest.approx(0.0023) and t.saved == pytest.approx(0.018 - 0.0023)
    assert t.escalation_cost == pytest.approx(0.002)
    assert (r.groups["coding"].escalated, r.groups["coding"].auto_chosen, r.groups["quick"].auto_chosen) == (1, 1, 1)
    text = report.render_table(r)
    assert "Checked answers: 3, 1 failed (their savings not counted); escalated 1 requests, costing $0.0020" in text
    assert "Alias chosen by auto: 2 requests" in text
    assert "Escalations and their cost: coding 1 ($0.0020)" in text
    lines = {x["group"]: x for x in csv.DictReader(io.StringIO(report.render_csv(r)))}
    assert lines["coding"]["failed_checks"] == "1" and lines["TOTAL"]["auto_chosen"] == "2"
