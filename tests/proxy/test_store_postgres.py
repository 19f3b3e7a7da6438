"""The usage store on a real PostgreSQL server: same migrations, same one-row-per-request, same SQL safety,
and the proxy writing to it when DELEGATE_DATABASE_URL points at it."""

from __future__ import annotations

import time
from pathlib import Path

import openai
import pytest

from proxy.usage import store
from proxy.usage.store import UsageStore
from tests.conftest import write_config
from tests.proxy.test_report import ROWS, row


@pytest.fixture
def pg(postgres_url: str) -> UsageStore:
    s = UsageStore.open(postgres_url)
    s.db.execute("DELETE FROM usage")
    return s


def test_migrations_and_one_row_per_request(pg: UsageStore, postgres_url: str) -> None:
    assert store.migrate(pg.db) == len(store.MIGRATIONS)
    assert pg.db.execute("SELECT name FROM _migrations ORDER BY version")[0] == ("m001_usage",)
    pg.insert(ROWS)
    pg.insert(ROWS)  # a retried batch
    assert pg.count() == 3
    rows = pg.rows(key_id="key_a")
    assert [r["request_id"] for r in rows] == ["req_2", "req_0"] and rows[0]["attempts"] == []
    assert isinstance(rows[0]["stream"], bool)


def test_parameterized(pg: UsageStore) -> None:
    pg.insert([row(0, request_id="x'); DROP TABLE usage; --", key_id="' OR '1'='1")])
    assert pg.rows(key_id="' OR '1'='1")[0]["request_id"] == "x'); DROP TABLE usage; --"
    assert pg.rows(key_id="nobody' OR '1'='1") == []


def test_proxy_writes_usage_to_postgres(pg: UsageStore, postgres_url: str, tmp_path: Path, fake_backend,  # type: ignore[no-untyped-def]
                                        start_proxy, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DELEGATE_DATABASE_URL", postgres_url)
    _, url = fake_backend("ok")
    proxy = start_proxy(write_config(tmp_path / "c.yaml", [("coding", "openai/ok", url)]))
    c = openai.OpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0)
    ids = [c.chat.completions.with_raw_response.create(model="coding", messages=[{"role": "user", "content": "hi"}])
           .headers["x-request-id"] for _ in range(3)]
    deadline = time.monotonic() + 20
    while pg.count() < 3 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert sorted(r["request_id"] for r in pg.rows()) == sorted(ids)
    assert not (tmp_path / "delegate-home" / "usage.db").exists()  # SQLite was not used


def test_unreachable_postgres_is_a_store_error() -> None:
    from tests.servers import refused_port

    with pytest.raises(store.StoreError, match="cannot connect"):
        UsageStore.open(f"postgresql://delegate@127.0.0.1:{refused_port()}/usage")


def test_budget_holds_on_postgres(pg: UsageStore, postgres_url: str) -> None:
    from concurrent.futures import ThreadPoolExecutor

    from proxy.usage.keys import KeyStore

    # two replicas: each its own connection, each its own holds
    a, b = KeyStore(pg, owner="replica-a"), KeyStore(UsageStore.open(postgres_url), owner="replica-b")
    _, issued = a.create(budget_usd=1.0)
    with ThreadPoolExecutor(8) as pool:
        holds = list(pool.map(lambda i: (a if i % 2 else b).reserve(issued.key_id, 0.3), range(8)))
    granted = [h for h in holds if h is not None]
    assert len(granted) == 3  # 3 x 0.3 fit in 1.0, a fourth would not, however the race goes
    assert a.get(issued.key_id).reserved_usd == pytest.approx(0.9)  # type: ignore[union-attr]
    mine = [h for h in granted if h in a.holds(owner="replica-a")]
    theirs = [h for h in granted if h not in mine]
    # replica b dies: after the stale time, a releases b's holds and never its own
    pg.db.execute("UPDATE holds SET renewed_at = renewed_at - 3600 WHERE owner = 'replica-b'")
    assert sorted(h.hold_id for h in a.reclaim_stale()) == sorted(h.hold_id for h in theirs)
    assert a.get(issued.key_id).reserved_usd == pytest.approx(0.3 * len(mine))  # type: ignore[union-attr]
    for h in mine:
        a.settle(h, 0.1)
    after = a.get(issued.key_id)
    assert after is not None and after.reserved_usd == pytest.approx(0, abs=1e-9)
    assert after.spent_usd == pytest.approx(0.1 * len(mine))
    pg.db.execute("UPDATE keys SET reserved_usd = 0.5 WHERE key_id = ?", (issued.key_id,))  # held by no hold row
    assert [kid for kid, _, _ in a.reconcile()] == [issued.key_id]
    assert a.get(issued.key_id).reserved_usd == 0  # type: ignore[union-attr]
