"""Issued keys through the real proxy: aliases, revocation, expiry, request rate, and a budget that
concurrent requests never overspend."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from pathlib import Path

import httpx
import litellm
import openai
import pytest

from proxy.usage.keys import KeyStore
from proxy.usage.store import UsageStore
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
    # at most five hold at once; one that finished early has settled its smaller real cost and freed room, so a
    # few more may fit during the burst: what must hold is the budget, checked below
    assert set(statuses) == {200, 429} and 1 <= statuses.count(200) <= 16
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


# --- the books: what a budget is charged, and holds that outlive neither their request nor their process --------

REFERENCE = "claude-sonnet-4-5"  # the default delegate.reference_model


def wait_for(check, timeout: float = 15):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not (value := check()) and time.monotonic() < deadline:
        time.sleep(0.1)
    return value


def settled(keys: KeyStore, kid: str):  # type: ignore[no-untyped-def]
    """The key once nothing is held on it any more."""
    wait_for(lambda: (k := keys.get(kid)) is not None and k.reserved_usd < 1e-12)
    return keys.get(kid)


@pytest.fixture
def story(tmp_path: Path, fake_backend, start_proxy):  # type: ignore[no-untyped-def]
    """A proxy whose `story` alias streams 50 words, 0.1 s apart."""
    slow, url = fake_backend("slow", mode="slow")
    config = write_config(tmp_path / "c.yaml", [("story", "openai/slow", url)], aliases=["story"])
    return start_proxy(config), slow


def test_a_stream_the_client_cuts_is_charged_what_it_delivered(story) -> None:  # type: ignore[no-untyped-def]
    proxy, slow = story
    keys = KeyStore(UsageStore.open())
    key, issued = keys.create(budget_usd=1.0)
    c = openai.OpenAI(base_url=proxy.url + "/v1", api_key=key, max_retries=0)
    with c.chat.completions.with_streaming_response.create(
            model="story", messages=[{"role": "user", "content": "tell me a long story " * 50}], stream=True,
            max_tokens=200) as raw:
        request_id = raw.headers["x-request-id"]
        seen = 0
        for chunk in raw.parse():
            seen += bool(chunk.choices and chunk.choices[0].delta.content)
            if seen == 5:
                break  # the client leaves: no [DONE], no usage chunk
    rows = wait_for(lambda: UsageStore.open().rows(request_id=request_id))
    row = rows[0]
    assert row["status"] == "partial" and 5 <= row["completion_tokens"] < 50 and row["prompt_tokens"] > 0
    expected = sum(litellm.cost_per_token(model=REFERENCE, prompt_tokens=row["prompt_tokens"],
                                          completion_tokens=row["completion_tokens"]))
    assert row["reference_cost"] == pytest.approx(expected) and expected > 0
    after = settled(keys, issued.key_id)
    assert after.reserved_usd == pytest.approx(0, abs=1e-12)  # the hold is released...
    assert after.spent_usd == pytest.approx(row["reference_cost"])  # ...and what was read is paid for
    assert keys.holds() == []


def test_tools_count_toward_the_worst_case(proxy) -> None:  # type: ignore[no-untyped-def]
    keys = KeyStore(UsageStore.open())
    key, issued = keys.create(budget_usd=0.05)
    small = [{"role": "user", "content": "hi"}]
    # 40 KB of tool schemas: the chat template renders them into the prompt, ~$0.12 of input at Sonnet's price
    tools = [{"type": "function", "function": {"name": f"tool_{i}", "description": "d" * 3900,
                                               "parameters": {"type": "object", "properties": {}}}} for i in range(10)]
    c = openai.OpenAI(base_url=proxy.url + "/v1", api_key=key, max_retries=0)
    assert c.chat.completions.create(model="coding", messages=small, max_tokens=100).choices  # fits the budget
    with pytest.raises(openai.RateLimitError) as refused:
        c.chat.completions.create(model="coding", messages=small, max_tokens=100, tools=tools)  # type: ignore[arg-type]
    error = refused.value.body  # type: ignore[union-attr]
    assert error["code"] == "insufficient_quota"  # type: ignore[index]
    up_to = float(error["message"].rsplit("this request up to $", 1)[1].rstrip(")"))  # type: ignore[index]
    tool_bytes = len(json.dumps(tools, separators=(",", ":")))
    assert up_to >= sum(litellm.cost_per_token(model=REFERENCE, prompt_tokens=tool_bytes, completion_tokens=100))
    # tools that fit are reserved and settled like any request
    assert c.chat.completions.create(model="coding", messages=small, max_tokens=100, tools=tools[:1]).choices  # type: ignore[arg-type]
    after = settled(keys, issued.key_id)
    assert after.reserved_usd == pytest.approx(0, abs=1e-12) and 0 < after.spent_usd < 0.05


def _in_flight(url: str, key: str, model: str, stream: bool, errors: list[BaseException]) -> threading.Thread:
    def ask() -> None:
        c = openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=60)
        try:
            out = c.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}], stream=stream,
                                            max_tokens=200)
            if stream:
                for _ in out:  # type: ignore[union-attr]
                    pass
        except Exception as e:  # noqa: BLE001 - the server going away is what this test does
            errors.append(e)

    thread = threading.Thread(target=ask, daemon=True)
    thread.start()
    return thread


@pytest.mark.parametrize("stream", [False, True])
def test_a_request_cut_off_by_shutdown_writes_its_row_and_releases_its_hold(tmp_path: Path, fake_backend,
                                                                            stream: bool) -> None:  # type: ignore[no-untyped-def]
    from proxy import settings
    from proxy.server.app import create_app
    from tests.servers import ServerThread

    # non-streaming: a backend that never answers; streaming: one that streams for 5 s. The grace period is 2 s.
    backend, url = fake_backend("b", mode="slow" if stream else "stall")
    keys = KeyStore(UsageStore.open())
    key, issued = keys.create(budget_usd=1.0)
    app = create_app(settings.load(write_config(tmp_path / "c.yaml", [("coding", "openai/b", url)])), None)
    errors: list[BaseException] = []
    with ServerThread(app) as server:
        thread = _in_flight(server.url, key, "coding", stream, errors)
        assert wait_for(lambda: backend.requests)
        time.sleep(0.5)
        held = keys.get(issued.key_id)
        assert held is not None and held.reserved_usd > 0 and len(keys.holds()) == 1
    # the server is stopped: no waiting, the shutdown wrote the row and settled the hold
    rows = UsageStore.open().rows(key_id=issued.key_id)
    assert len(rows) == 1
    row = rows[0]
    after = keys.get(issued.key_id)
    assert after is not None and after.reserved_usd == pytest.approx(0, abs=1e-12) and keys.holds() == []
    if stream:
        assert row["status"] == "partial" and row["completion_tokens"] > 0 and row["reference_cost"] > 0
    else:
        assert row["status"] == "cancelled" and row["reference_cost"] == 0 and "shut down" in row["error"]
    assert after.spent_usd == pytest.approx(row["reference_cost"])
    thread.join(10)
    assert errors or stream  # the non-streaming client saw its connection go


def test_holds_left_by_a_crashed_process_are_released_at_start_up(tmp_path: Path, fake_backend,
                                                                  start_proxy) -> None:  # type: ignore[no-untyped-def]
    store = UsageStore.open()
    dead, live = KeyStore(store, owner="gone-host:4242:dead"), KeyStore(store, owner="other-replica:7:live")
    key, issued = dead.create(budget_usd=0.05)
    _, other = dead.create(budget_usd=1.0)
    crashed = dead.reserve(issued.key_id, 0.045)  # a request that was in flight when its process died
    assert crashed is not None
    store.db.execute("UPDATE holds SET renewed_at = ? WHERE hold_id = ?", (time.time() - 3600, crashed.hold_id))
    running = live.reserve(other.key_id, 0.25)  # another replica's request, in flight now: it must stay held
    assert running is not None
    _, url = fake_backend("ok")
    proxy = start_proxy(write_config(tmp_path / "c.yaml", [("coding", "openai/ok", url)]))
    keys = KeyStore(store)
    assert keys.get(issued.key_id).reserved_usd == pytest.approx(0, abs=1e-12)  # type: ignore[union-attr]
    assert keys.get(other.key_id).reserved_usd == pytest.approx(0.25)  # type: ignore[union-attr]
    assert keys.holds() == [running]
    # the key's budget is usable again: $0.045 still held would leave no room for this request's worst case
    assert post(proxy, key, max_tokens=100).status_code == 200
    live.settle(running, 0.1)  # the live replica's request finishes: its hold is swapped for its cost
    final = keys.get(other.key_id)
    assert final is not None and final.reserved_usd == pytest.approx(0, abs=1e-12)
    assert final.spent_usd == pytest.approx(0.1)
    assert settled(keys, issued.key_id).spent_usd > 0 and keys.holds() == []


def test_a_live_process_keeps_its_holds(tmp_path: Path, fake_backend, start_proxy,
                                        monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    from proxy.usage import recorder

    monkeypatch.setattr(recorder, "HOLD_RENEW_S", 0.2)
    backend, url = fake_backend("b", mode="stall")
    proxy = start_proxy(write_config(tmp_path / "c.yaml", [("coding", "openai/b", url)]))
    store = UsageStore.open()
    key, issued = KeyStore(store).create(budget_usd=1.0)
    time.sleep(1.1)  # the proxy notices that keys exist
    _in_flight(proxy.url, key, "coding", False, [])
    assert wait_for(lambda: backend.requests)
    time.sleep(1.5)
    # another replica looking for holds not renewed for a second finds none: this one is alive and renewing
    assert KeyStore(store, owner="other").reclaim_stale(stale_s=1.0) == []
    assert len(KeyStore(store).holds()) == 1


def test_a_hold_released_as_stale_is_still_charged() -> None:
    store = UsageStore.open()
    mine, theirs = KeyStore(store, owner="a"), KeyStore(store, owner="b")
    _, issued = mine.create(budget_usd=1.0)
    hold = mine.reserve(issued.key_id, 0.5)
    assert hold is not None and mine.reserve(issued.key_id, 0.6) is None  # 0.5 + 0.6 would pass the budget
    assert theirs.reclaim_stale(stale_s=3600) == []  # fresh: not touched
    assert theirs.reclaim_stale(stale_s=-1) == [hold]  # as if not renewed: released
    assert mine.get(issued.key_id).reserved_usd == 0  # type: ignore[union-attr]
    mine.settle(hold, 0.2)  # the request did finish after all: what it delivered is charged, nothing released twice
    after = mine.get(issued.key_id)
    assert after is not None and after.reserved_usd == 0 and after.spent_usd == pytest.approx(0.2)


def test_a_budget_held_by_no_one_is_reconciled_at_start_up(tmp_path: Path, fake_backend,
                                                           start_proxy) -> None:  # type: ignore[no-untyped-def]
    store = UsageStore.open()
    key, issued = KeyStore(store).create(budget_usd=0.05)
    # what a crashed proxy from before the holds table left: $0.045 held, by no request that is still running
    store.db.execute("UPDATE keys SET reserved_usd = 0.045 WHERE key_id = ?", (issued.key_id,))
    _, url = fake_backend("ok")
    proxy = start_proxy(write_config(tmp_path / "c.yaml", [("coding", "openai/ok", url)]))
    assert KeyStore(store).get(issued.key_id).reserved_usd == pytest.approx(0, abs=1e-12)  # type: ignore[union-attr]
    assert post(proxy, key, max_tokens=100).status_code == 200
