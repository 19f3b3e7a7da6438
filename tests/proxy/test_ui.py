"""The savings page, rendered by a real headless Chromium (Debian's `chromium`) against the real proxy.

A screenshot is kept in test-artifacts/savings-page.png.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from proxy.store import UsageStore
from tests.conftest import write_config
from tests.proxy.test_report import row
from tests.servers import ROOT

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARTIFACTS = ROOT / "test-artifacts"


def chromium(url: str, *extra: str) -> str:
    if not Path(CHROMIUM).exists():
        pytest.fail("chromium is not installed: `make test` installs it (apt-get install chromium)")
    profile = ARTIFACTS / "chromium-profile"
    args = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            f"--user-data-dir={profile}", "--virtual-time-budget=4000", *extra, url]
    result = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


def test_savings_page_renders_chart_tasks_and_recent_requests(tmp_path: Path, fake_backend, start_proxy) -> None:  # type: ignore[no-untyped-def]
    now = time.time()
    rows = [row(i, created_at=now - 86400 * (i % 5) - 60, request_id=f"req_{i}",
                alias=("coding", "quick", "review")[i % 3]) for i in range(12)]
    UsageStore.open().insert(rows)
    _, url = fake_backend("ok")
    proxy = start_proxy(write_config(tmp_path / "c.yaml", [("coding", "openai/ok", url)]), master_key="sk-ui")
    ARTIFACTS.mkdir(exist_ok=True)

    dom = chromium(f"{proxy.url}/ui?key=sk-ui&days=7", "--dump-dom")
    saved = sum(r["saved"] for r in rows)
    assert f"${saved:.4f} (98%)" in dom  # the Saved card, from the page's own fetch of /ui/data
    assert "$0.0720" in dom  # Claude would have cost
    path = re.search(r'id="saved-line" d="([^"]+)"', dom)
    assert path is not None and path.group(1).count("L") == 6  # one point per day of the week shown
    assert len(re.findall(r'class="bar"', dom)) == 7
    for task in ("coding", "quick", "review"):
        assert f'data-task="{task}"' in dom
    assert dom.count("<tr") == 2 + 3 + 12  # two header rows, a row per task, the twelve requests

    shot = ARTIFACTS / "savings-page.png"
    shot.unlink(missing_ok=True)
    chromium(f"{proxy.url}/ui?key=sk-ui&days=7", f"--screenshot={shot}", "--window-size=1100,1000")
    assert shot.exists() and shot.stat().st_size > 10_000


def test_savings_page_without_the_key_says_so(tmp_path: Path, fake_backend, start_proxy) -> None:  # type: ignore[no-untyped-def]
    _, url = fake_backend("ok")
    proxy = start_proxy(write_config(tmp_path / "c.yaml", [("coding", "openai/ok", url)]), master_key="sk-ui")
    ARTIFACTS.mkdir(exist_ok=True)
    assert "cannot load usage: HTTP 401" in chromium(f"{proxy.url}/ui", "--dump-dom")
