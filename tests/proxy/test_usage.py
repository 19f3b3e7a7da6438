"""One usage row per request, with the right fields, through the real proxy; costs that add up to the cent.

Backends are fake OpenAI-compatible servers on loopback (local deployments, 100 W each); the reference
model is priced by LiteLLM's own table, as in production.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
from pathlib import Path

import httpx
import litellm
import openai
import pytest

from proxy.usage import report
from proxy.usage.store import UsageStore
from tests.conftest import write_config
from tests.servers import refused_port, wait_rows

BIG = [{"role": "user", "content": "x" * 40_000}]  # 10,000 prompt tokens at the fake's 4 characters a token
WATTS, KWH = 100, 0.30
REFERENCE = "claude-sonnet-4-5"



@pytest.fixture
def setup(tmp_path: Path, fake_backend, start_proxy):  # type: ignore[no-untyped-def]
    backend, url = fake_backend("ok")
    slow, slow_url = fake_backend("slow", mode="slow")
    dead = f"http://127.0.0.1:{refused_port()}/v1"
    config = write_config(tmp_path / "c.yaml", [
        ("coding", "openai/ok-model", url), ("chat", "openai/dead", dead), ("fallback-model", "openai/fallback", url),
        ("broken", "openai/dead2", f"http://127.0.0.1:{refused_port()}/v1"), ("story", "openai/slow", slow_url)],
        fallbacks={"chat": ["fallback-model"]}, aliases=["coding", "chat", "broken", "story"],
        delegate={"reference_model": REFERENCE, "electricity_usd_per_kwh": KWH})
    return start_proxy(config), backend, slow


def test_mixed_requests_make_exactly_one_row_each(setup) -> None:  # type: ignore[no-untyped-def]
    proxy, _, _ = setup
    c = openai.OpenAI(base_url=proxy.url + "/v1", api_key="sk-a", max_retries=0)
    ids = []
    for _ in range(3):
        ids.append(c.chat.completions.with_raw_response.create(model="coding", messages=BIG).headers["x-request-id"])
    with c.chat.completions.with_streaming_response.create(model="coding", messages=BIG, stream=True) as raw:
        ids.append(raw.headers["x-request-id"])
        list(raw.parse())
    with c.chat.completions.with_streaming_response.create(model="coding", messages=BIG, stream=True,
                                                          stream_options={"include_usage": True}) as raw:
        ids.append(raw.headers["x-request-id"])
        list(raw.parse())
    ids.append(c.chat.completions.with_raw_response.create(model="chat", messages=BIG).headers["x-request-id"])
    with c.chat.completions.with_streaming_response.create(model="chat", messages=BIG, stream=True) as raw:
        ids.append(raw.headers["x-request-id"])
        list(raw.parse())
    for _ in range(2):
        r = httpx.post(proxy.url + "/v1/chat/completions", json={"model": "broken", "messages": BIG})
        assert r.status_code == 503
        ids.append(r.headers["x-request-id"])

    async def concurrent() -> list[str]:
        ac = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="sk-b", max_retries=0)
        raws = await asyncio.gather(*(ac.chat.completions.with_raw_response.create(model="coding", messages=BIG)
                                      for _ in range(4)))
        return [r.headers["x-request-id"] for r in raws]

    ids += asyncio.run(concurrent())
    rows = wait_rows(len(ids))
    time.sleep(0.5)
    rows = UsageStore.open().rows()
    assert sorted(r["request_id"] for r in rows) == sorted(ids)  # exactly one row per request
    by_id = {r["request_id"]: r for r in rows}

    ok = by_id[ids[0]]
    assert (ok["alias"], ok["status"], ok["model"]) == ("coding", "success", "openai/ok-model")
    assert (ok["backend"], ok["fallbacks"]) == ("openai", 0)
    assert (ok["prompt_tokens"], ok["completion_tokens"]) == (10_000, 3)  # the backend's own counts
    assert ok["key_id"] and ok["key_id"].startswith("key_") and "sk-a" not in json.dumps(ok)
    assert ok["latency_s"] > 0 and ok["reference_model"] == REFERENCE
    for stream_id in ids[3:5]:  # streams: real usage, with or without include_usage, and a request id
        s = by_id[stream_id]
        assert s["stream"] and (s["prompt_tokens"], s["completion_tokens"]) == (10_000, 3) and s["reference_cost"] > 0
        assert s["ttft_s"] is not None
    for fallback_id in ids[5:7]:  # the fallback that served is recorded, not the alias that was asked for
        f = by_id[fallback_id]
        assert (f["alias"], f["model"], f["fallbacks"], f["status"]) == ("chat", "openai/fallback", 1, "success")
        assert [a["ok"] for a in f["attempts"]] == [False, True]
        assert f["attempts"][0]["model"] == "dead"
    for failed_id in ids[7:9]:
        e = by_id[failed_id]
        assert (e["status"], e["model"], e["reference_cost"], e["completion_tokens"]) == ("error", None, 0.0, 0)
        assert e["error_class"] and e["error"]
    assert {by_id[i]["key_id"] for i in ids[9:]} != {ok["key_id"]}  # another key, another id

    # an independent recomputation from the raw rows with LiteLLM's prices equals the report
    expected_ref = expected_local = 0.0
    for r in rows:
        if r["status"] == "success":
            expected_ref += sum(litellm.cost_per_token(model=REFERENCE, prompt_tokens=r["prompt_tokens"],
                                                       completion_tokens=r["completion_tokens"]))
        if r["model"]:
            expected_local += WATTS * r["generation_s"] / 3_600_000 * KWH
    total = report.build(rows, None, report.datetime.now(report.UTC)).total
    assert total.calls == len(ids)
    assert round(total.reference_cost, 2) == round(expected_ref, 2) and total.reference_cost == pytest.approx(expected_ref)
    assert round(total.local_cost, 2) == round(expected_local, 2) and total.local_cost == pytest.approx(expected_local)
    assert total.saved == pytest.approx(expected_ref - expected_local)
    assert expected_ref > 0.3  # 11 answered requests of 10,000 prompt tokens at Sonnet's price: dollars, not dust


def test_client_gone_mid_stream_records_partial_usage_and_stops_the_backend(setup) -> None:  # type: ignore[no-untyped-def]
    proxy, _, slow = setup
    body = {"model": "story", "messages": [{"role": "user", "content": "tell me a long story"}], "stream": True}
    with httpx.stream("POST", proxy.url + "/v1/chat/completions", json=body) as r:
        request_id = r.headers["x-request-id"]
        seen = 0
        for line in r.iter_lines():
            if '"content"' in line:
                seen += 1
            if seen == 3:
                break
    rows = wait_rows(1)
    assert [r["request_id"] for r in rows] == [request_id]
    row = rows[0]
    assert row["status"] == "partial"
    assert 3 <= row["completion_tokens"] < 50
    assert row["prompt_tokens"] > 0  # estimated: the usage chunk never came
    # what was delivered is priced: the prompt and the tokens the client received before it left
    assert row["reference_cost"] == pytest.approx(sum(litellm.cost_per_token(
        model=REFERENCE, prompt_tokens=row["prompt_tokens"], completion_tokens=row["completion_tokens"])))
    assert row["reference_cost"] > 0 and row["local_cost"] > 0
    deadline = time.monotonic() + 10
    while slow.cancelled == 0 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert slow.cancelled == 1  # the backend's stream was closed: it stops generating


def test_locked_store_keeps_serving_and_writes_later(setup, delegate_home: Path) -> None:  # type: ignore[no-untyped-def]
    proxy, _, _ = setup
    c = openai.OpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0)
    c.chat.completions.create(model="coding", messages=[{"role": "user", "content": "warm"}])
    assert len(wait_rows(1)) == 1
    lock = sqlite3.connect(delegate_home / "usage.db", isolation_level=None)
    lock.execute("BEGIN EXCLUSIVE")
    try:
        for _ in range(3):  # served while the store is locked
            assert c.chat.completions.create(model="coding", messages=[{"role": "user", "content": "hi"}]).choices
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            ready = httpx.get(proxy.url + "/health/readiness")
            if ready.status_code == 503:
                break
            time.sleep(0.3)
        assert ready.status_code == 503 and "usage store not writable" in " ".join(ready.json()["problems"])
    finally:
        lock.execute("ROLLBACK")
        lock.close()
    assert len(wait_rows(4, timeout=60)) == 4  # kept, then written
    deadline = time.monotonic() + 15
    while httpx.get(proxy.url + "/health/readiness").status_code != 200 and time.monotonic() < deadline:
        time.sleep(0.3)
    assert httpx.get(proxy.url + "/health/readiness").status_code == 200


def test_shutdown_flushes_pending_rows(tmp_path: Path, fake_backend) -> None:  # type: ignore[no-untyped-def]
    from proxy import settings
    from proxy.server.app import create_app
    from tests.servers import ServerThread

    _, url = fake_backend("ok")
    app = create_app(settings.load(write_config(tmp_path / "c.yaml", [("coding", "openai/ok", url)])), None)
    with ServerThread(app) as server:
        c = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)
        for _ in range(5):
            c.chat.completions.create(model="coding", messages=[{"role": "user", "content": "hi"}])
    assert UsageStore.open().count() == 5  # no wait: the shutdown wrote them


def test_rows_the_store_refuses_at_shutdown_survive_to_the_next_start(tmp_path: Path, fake_backend,
                                                                      delegate_home: Path) -> None:  # type: ignore[no-untyped-def]
    from proxy import settings
    from proxy.server.app import create_app
    from tests.servers import ServerThread

    _, url = fake_backend("ok")
    config = settings.load(write_config(tmp_path / "c.yaml", [("coding", "openai/ok", url)]))
    UsageStore.open()  # create the file to lock
    lock = sqlite3.connect(delegate_home / "usage.db", isolation_level=None)
    with ServerThread(create_app(config, None)) as server:
        lock.execute("BEGIN EXCLUSIVE")
        c = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)
        for _ in range(3):
            c.chat.completions.create(model="coding", messages=[{"role": "user", "content": "hi"}])
        time.sleep(2.5)  # the success events arrive; the writes fail
    lock.execute("ROLLBACK")
    lock.close()
    assert UsageStore.open().count() == 0
    assert len((delegate_home / "pending-usage.jsonl").read_text().splitlines()) == 3
    with ServerThread(create_app(config, None)):
        assert len(wait_rows(3)) == 3
    assert not (delegate_home / "pending-usage.jsonl").exists()


def test_spend_endpoints(setup) -> None:  # type: ignore[no-untyped-def]
    proxy, _, _ = setup
    c = openai.OpenAI(base_url=proxy.url + "/v1", api_key="sk-spender", max_retries=0)
    first = c.chat.completions.with_raw_response.create(model="coding", messages=BIG).headers["x-request-id"]
    c.chat.completions.create(model="chat", messages=BIG)
    wait_rows(2)
    logs = httpx.get(proxy.url + "/spend/logs").json()
    assert len(logs) == 2
    entry = next(e for e in logs if e["request_id"] == first)
    for field in ("request_id", "call_type", "api_key", "spend", "total_tokens", "prompt_tokens", "completion_tokens",
                  "startTime", "endTime", "model", "model_group", "status", "saved"):
        assert field in entry
    assert entry["saved"] == pytest.approx(entry["reference_cost"] - entry["spend"])
    assert [e["request_id"] for e in httpx.get(proxy.url + "/spend/logs", params={"request_id": first}).json()] == [first]
    assert len(httpx.get(proxy.url + "/spend/logs", params={"api_key": "sk-spender"}).json()) == 2
    assert httpx.get(proxy.url + "/spend/logs", params={"api_key": "sk-other"}).json() == []
    assert httpx.get(proxy.url + "/spend/logs", params={"start_date": "2099-01-01"}).json() == []
    assert httpx.get(proxy.url + "/spend/logs", params={"start_date": "yesterday"}).status_code == 400
    today = time.strftime("%Y-%m-%d", time.gmtime())
    by_model = httpx.get(proxy.url + "/global/spend/report", params={"start_date": today, "end_date": today,
                                                                        "group_by": "model"}).json()
    assert by_model[0]["group_by_day"] == today
    assert {m["model"] for m in by_model[0]["models"]} == {"openai/ok-model", "openai/fallback"}


def test_spend_endpoints_need_the_master_key(tmp_path: Path, fake_backend, start_proxy) -> None:  # type: ignore[no-untyped-def]
    _, url = fake_backend("ok")
    proxy = start_proxy(write_config(tmp_path / "c.yaml", [("coding", "openai/ok", url)]), master_key="sk-master")
    for path in ("/spend/logs", "/global/spend/report", "/ui/data"):
        assert httpx.get(proxy.url + path).status_code == 401
        assert httpx.get(proxy.url + path, headers={"authorization": "Bearer sk-master"}).status_code == 200
