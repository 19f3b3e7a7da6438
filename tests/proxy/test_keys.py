"""Issued keys through the real proxy: aliases, revocation, expiry, request rate, and a budget that
concurrent requests never overspend."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import httpx
import pytest

from proxy.keys import KeyStore
from proxy.store import UsageStore
from tests.conftest import write_config

MSG = [{"role": "user", "content": "x" * 4000}]


@pytest.fixture
def proxy(tmp_path: Path, fake_backend, start_proxy):  # type: ignore[no-untyped-def]
    _, url = fake_backend("ok")
    config = write_config(tmp_path / "c.yaml", [("coding", "openai/ok", url), ("quick", "openai/ok", url)],
                          aliases=["coding", "quick"])
    return start_proxy(config)


def post(proxy, key: str | None, model: str = "coding", **extra):  # type: ignore[no-untyped-def]
    headers = {"authorization": f"Bearer {key}"} if key else {}
    return httpx.post(proxy.url + "/v1/chat/completions", json={"model": model, "messages": MSG, **extra},
                      headers=headers, timeout=30)


def test_open_proxy_closes_once_a_key_is_issued(proxy) -> None:  # type: ignore[no-untyped-def]
    assert post(proxy, None).status_code == 200
    key, _ = KeyStore(UsageStore.open()).create(name="ci")
    time.sleep(1.1)  # the proxy re-checks "no keys issued" at most once a second
    assert post(proxy, None).status_code == 401
    assert post(proxy, "sk-made-up").status_code == 401
    assert post(proxy, key).status_code == 200


def test_key_is_limited_to_its_aliases(proxy) -> None:  # type: ignore[no-untyped-def]
    key, issued = KeyStore(UsageStore.open()).create(aliases=["quick"])
    assert post(proxy, key, "quick").status_code == 200
    r = post(proxy, key, "coding")
    assert r.status_code == 403 and r.json()["error"]["code"] == "alias_not_allowed"


def test_revoked_and_expired_keys_get_401_at_once(proxy) -> None:  # type: ignore[no-untyped-def]
    keys = KeyStore(UsageStore.open())
    key, issued = keys.create()
    assert post(proxy, key).status_code == 200
    assert keys.revoke(issued.key_id)
    r = post(proxy, key)
    assert r.status_code == 401 and "revoked" in r.json()["error"]["message"]
    soon, _ = keys.create(expires_at=time.time() + 1)
    assert post(proxy, soon).status_code == 200
    time.sleep(1.2)
    r = post(proxy, soon)
    assert r.status_code == 401 and "expired" in r.json()["error"]["message"]


def test_request_rate(proxy) -> None:  # type: ignore[no-untyped-def]
    key, _ = KeyStore(UsageStore.open()).create(rpm=3)
    assert [post(proxy, key).status_code for _ in range(3)] == [200, 200, 200]
    r = post(proxy, key)
    assert r.status_code == 429 and r.json()["error"]["code"] == "rate_limited"
    assert 1 <= int(r.headers["retry-after"]) <= 60


def test_concurrent_requests_never_overspend_the_budget(proxy) -> None:  # type: ignore[no-untyped-def]
    keys = KeyStore(UsageStore.open())
    # each request holds its worst case, ~4,300 prompt bytes + 100 tokens at Sonnet's price, ~$0.0145:
    # the budget fits five at once, the real cost of each (1,000 prompt tokens) is ~$0.0045
    key, issued = keys.create(budget_usd=0.075)

    async def burst(n: int) -> list[int]:
        async with httpx.AsyncClient(timeout=30) as c:
            rs = await asyncio.gather(*(c.post(proxy.url + "/v1/chat/completions", headers={"authorization": f"Bearer {key}"},
                                               json={"model": "coding", "messages": MSG, "max_tokens": 100})
                                        for _ in range(n)))
        return [r.status_code for r in rs]

    statuses = asyncio.run(burst(20))
    assert set(statuses) == {200, 429} and 1 <= statuses.count(200) <= 5
    deadline = time.monotonic() + 15
    while (k := keys.get(issued.key_id)) and k.reserved_usd > 1e-12 and time.monotonic() < deadline:
        time.sleep(0.1)
    after = keys.get(issued.key_id)
    assert after is not None and after.reserved_usd == pytest.approx(0, abs=1e-12)
    assert after.spent_usd <= issued.budget_usd  # type: ignore[operator]
    # what was spent is what the stored rows say the answered requests cost
    deadline = time.monotonic() + 15
    while len(UsageStore.open().rows(key_id=issued.key_id)) < statuses.count(200) and time.monotonic() < deadline:
        time.sleep(0.1)
    rows = UsageStore.open().rows(key_id=issued.key_id)
    assert after.spent_usd == pytest.approx(sum(r["reference_cost"] for r in rows))
    # settled reservations free room: more requests fit, until the budget is truly used
    more = 0
    while post(proxy, key, max_tokens=100).status_code == 200:
        more += 1
        assert more < 50
    final = keys.get(issued.key_id)
    assert final is not None and final.spent_usd <= issued.budget_usd  # type: ignore[operator]
    assert statuses.count(200) + more > 5


def test_admin_endpoints_need_the_master_key(tmp_path: Path, fake_backend, start_proxy) -> None:  # type: ignore[no-untyped-def]
    _, url = fake_backend("ok")
    proxy = start_proxy(write_config(tmp_path / "c.yaml", [("coding", "openai/ok", url)]), master_key="sk-master-1")
    key, _ = KeyStore(UsageStore.open()).create()
    assert post(proxy, key).status_code == 200
    assert httpx.get(proxy.url + "/spend/logs", headers={"authorization": f"Bearer {key}"}).status_code == 403
    assert httpx.get(proxy.url + "/spend/logs", headers={"authorization": "Bearer sk-master-1"}).status_code == 200


def test_keys_are_stored_hashed(proxy) -> None:  # type: ignore[no-untyped-def]
    key, issued = KeyStore(UsageStore.open()).create(name="hashed")
    raw = UsageStore.open().db.execute("SELECT * FROM keys")
    assert key not in repr(raw) and issued.key_id in repr(raw)
