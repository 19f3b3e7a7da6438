"""make bench-routing: how well `model="auto"` picks the alias, on prompts it was not trained on.

Reads bench/routing/eval.jsonl (kept apart from bench/routing/train.jsonl, which bench/train_router.py trains
on), sends each prompt through proxy/routing/auto.py's decision exactly as the proxy does (chat messages, a
system message where the row has one), and writes accuracy, the confusion matrix by alias and the decision's
latency to BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from bench.report import replace_section  # noqa: E402
from proxy.routing.auto import AutoRouter, labels  # noqa: E402

EVAL = ROOT / "bench" / "routing" / "eval.jsonl"
ROUNDS = 50
TARGET_ACCURACY, TARGET_P99_MS = 0.90, 2.0


def messages(row: dict[str, str]) -> list[dict[str, Any]]:
    system = [{"role": "system", "content": row["system"]}] if row.get("system") else []
    return [*system, {"role": "user", "content": row["prompt"]}]


def read(path: Path) -> list[dict[str, str]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def evaluate(router: AutoRouter, rows: list[dict[str, str]]) -> tuple[float, dict[tuple[str, str], int]]:
    """(accuracy, {(labelled, chosen): count})."""
    confusion: dict[tuple[str, str], int] = {}
    for row in rows:
        key = (row["alias"], router.choose(messages(row)) or "none")
        confusion[key] = confusion.get(key, 0) + 1
    right = sum(n for (want, got), n in confusion.items() if want == got)
    return right / len(rows), confusion


def latencies_ms(router: AutoRouter, requests: list[list[dict[str, Any]]], rounds: int) -> list[float]:
    out = []
    for _ in range(rounds):
        for request in requests:
            start = time.perf_counter()
            router.choose(request)
            out.append((time.perf_counter() - start) * 1000)
    return sorted(out)


def percentile(sorted_values: list[float], q: float) -> float:
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--eval", type=Path, default=EVAL)
    parser.add_argument("--no-write", action="store_true", help="print, do not touch BENCHMARKS.md")
    args = parser.parse_args()
    rows = read(args.eval)
    aliases = [a for a in labels() if any(r["alias"] == a for r in rows)]
    router = AutoRouter(aliases)
    accuracy, confusion = evaluate(router, rows)
    small = latencies_ms(router, [messages(r) for r in rows], ROUNDS)
    paste = (ROOT / "proxy" / "server" / "completions.py").read_text() * 20  # ~200 KB: only head and tail are read
    large = latencies_ms(router, [[{"role": "user", "content": "what does this do?\n" + paste}]], 200)

    header = "| labelled \\ chosen | " + " | ".join(aliases) + " | right |"
    table = [header, "| --- " * (len(aliases) + 2) + "|"]
    for want in aliases:
        counts = [confusion.get((want, got), 0) for got in aliases]
        total = sum(n for (w, _), n in confusion.items() if w == want)
        table.append(f"| **{want}** | " + " | ".join(str(n) if n else "·" for n in counts)
                     + f" | {confusion.get((want, want), 0)}/{total} |")
    command = "make bench-routing (`.venv/bin/python bench/bench_routing.py`)"
    lines = [
        "## Routing `model=\"auto\"` (`make bench-routing`)", "",
        f"Command: {command}, {time.strftime('%Y-%m-%d')}, {platform.machine()} with {os.cpu_count()} CPUs, "
        f"Python {platform.python_version()}. {len(rows)} labelled prompts in `bench/routing/eval.jsonl`, none of them "
        f"in the {len(read(ROOT / 'bench' / 'routing' / 'train.jsonl'))} the classifier was trained on "
        "(`bench/train_router.py`).", "",
        f"**Accuracy: {accuracy:.1%}** ({sum(n for (w, g), n in confusion.items() if w == g)}/{len(rows)}; "
        f"target {TARGET_ACCURACY:.0%}).", "",
        *table, "",
        f"Decision latency (`AutoRouter.choose`, in process, {ROUNDS} rounds over the set): "
        f"p50 {statistics.median(small) * 1000:.0f} µs, p99 {percentile(small, 0.99) * 1000:.0f} µs, "
        f"max {small[-1] * 1000:.0f} µs; a 200 KB paste: p50 {statistics.median(large) * 1000:.0f} µs, "
        f"p99 {percentile(large, 0.99) * 1000:.0f} µs (target p99 {TARGET_P99_MS:g} ms). No model is called.",
    ]
    text = "\n".join(lines)
    print(text)
    if not args.no_write:
        replace_section(ROOT / "BENCHMARKS.md", "routing", text)
    return 0 if accuracy >= TARGET_ACCURACY and percentile(small, 0.99) <= TARGET_P99_MS else 1


if __name__ == "__main__":
    sys.exit(main())
