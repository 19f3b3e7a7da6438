"""Every usage row says where its request came from (the `x-delegate-source` header the client tools send),
and the report, the spend logs and the savings page's data group by it."""

from __future__ import annotations

import time
from pathlib import Path

import httpx

from proxy.usage.store import UsageStore
from tests.conftest import write_config

MSG = [{"role": "user", "content": "hi"}]


def test_rows_carry_their_source_and_the_books_group_by_it(tmp_path: Path, fake_backend, start_proxy) -> None:  # type: ignore[no-untyped-def]
    _, url = fake_backend("ok")
    proxy = start_proxy(write_config(tmp_path / "c.yaml", [("quick", "openai/ok", url)]))
    sent = {"cli": 2, "mcp": 1, "review": 1, None: 1, "forged-label": 1}
    for source, n in sent.items():
        headers = {"x-delegate-source": source} if source else {}
        for _ in range(n):
            r = httpx.post(proxy.url + "/v1/chat/completions", json={"model": "quick", "messages": MSG}, headers=headers)
            assert r.status_code == 200
    r = httpx.post(proxy.url + "/v1/completions", json={"model": "quick", "prompt": "x"}, headers={"x-delegate-source": "CLI"})
    assert r.status_code == 200
    deadline = time.monotonic() + 15
    while len(UsageStore.open().rows()) < 7 and time.monotonic() < deadline:
        time.sleep(0.1)
    rows = UsageStore.open().rows()
    counts: dict[str, int] = {}
    for row in rows:
        counts[row["source"]] = counts.get(row["source"], 0) + 1
    assert counts == {"cli": 3, "mcp": 1, "review": 1, "api": 2}  # no header and an unknown label are both api
    logs = httpx.get(proxy.url + "/spend/logs").json()
    assert sorted(entry["metadata"]["source"] for entry in logs) == sorted(r["source"] for r in rows)
    page = httpx.get(proxy.url + "/ui/data").json()
    assert {k: v["calls"] for k, v in page["by_source"].items()} == counts
