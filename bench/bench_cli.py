"""make bench-cli: how long `delegate --help` (and each command's --help) takes, against a bare Python start.

The CLI imports nothing heavy before a command runs (tests/proxy/test_cli.py checks which modules load);
this measures the wall time a user feels. Median of 20 runs each, written to BENCHMARKS.md.
"""

from __future__ import annotations

import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from bench.report import replace_section  # noqa: E402

DELEGATE = str(Path(sys.executable).parent / "delegate")
RUNS = 20


def median_ms(cmd: list[str]) -> float:
    times = []
    for _ in range(RUNS):
        start = time.perf_counter()
        subprocess.run(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def main() -> int:
    rows = [("python -c pass (the floor)", median_ms([sys.executable, "-c", "pass"]))]
    for args in (["--help"], ["ask", "--help"], ["review", "--help"], ["report", "--help"]):
        rows.append((f"delegate {' '.join(args)}", median_ms([DELEGATE, *args])))
    lines = ["## CLI start-up (`make bench-cli`)", "",
             f"Command: `make bench-cli` (`.venv/bin/python bench/bench_cli.py`), {time.strftime('%Y-%m-%d')}, "
             f"{platform.machine()} with {os.cpu_count()} CPUs. Median wall time of {RUNS} runs; target under 500 ms.", "",
             "| command | median ms |", "| --- | --- |", *[f"| `{name}` | {ms:.0f} |" for name, ms in rows]]
    replace_section(ROOT / "BENCHMARKS.md", "cli", "\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
