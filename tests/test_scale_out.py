"""Scale-out with real parts: two proxy replicas sharing a real Redis and a real Postgres, two backend
processes behind one alias. No mocks: the servers come from Debian's redis-server and postgresql."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from proxy.usage.keys import KeyStore
from proxy.usage.store import UsageStore
from tests.conftest import postgres_server, redis_server, write_config
from tests.servers import ROOT, free_port, refused_port, wait_http
from tests.test_faults import backend_process

MSG = [{"role": "user", "content": "hello " * 200}]


@contextlib.contextmanager
def replica(config: Path, env: dict[str, str]) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "proxy.client.cli", "serve", "--no-backend", "--config", str(config), "--port",
                             str(port)], cwd=ROOT, env={**os.environ, **env}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(url + "/health/readiness", 120, proc=proc)
        yield proc, url
    finally:
        if proc.poll() is None:
            proc.terminate()
            proc.wait(60)


def scale_config(path: Path, urls: list[str], redis_port: int, retries: int = 2) -> Path:
    return write_config(path, [("coding", f"openai/b{i}", url) for i, url in enumerate(urls)], aliases=["coding"],
                        router={"redis_host": "127.0.0.1", "redis_port": redis_port, "num_retries": retries,
                                "allowed_fails": 0, "cooldown_time": 120, "retry_after": 0})


async def burst(urls: list[str], total: int, concurrency: int, key: str | None = None,
                during: object = None) -> tuple[list[str], list[int]]:
    """`total` requests spread over `urls` round-robin: ids of the completed ones, and every status seen."""
    done: list[str] = []
    statuses: list[int] = []
    counter = iter(range(total))
    headers = {"authorization": f"Bearer {key}"} if key else {}

    async def worker(client: httpx.AsyncClient) -> None:
        for i in counter:
            if during is not None and i == total // 3:
                during()  # type: ignore[operator]
            try:
                r = await client.post(urls[i % len(urls)] + "/v1/chat/completions", headers=headers,
                                      json={"model": "coding", "messages": MSG, "max_tokens": 20})
                statuses.append(r.status_code)
                if r.status_code == 200:
                    done.append(r.headers["x-request-id"])
            except httpx.HTTPError:
                statuses.append(0)

    async with httpx.AsyncClient(timeout=60) as client:
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
    return done, statuses


def wait_count(store: UsageStore, n: int, timeout: float = 30) -> int:
    deadline = time.monotonic() + timeout
    while (count := store.count()) < n and time.monotonic() < deadline:
        time.sleep(0.2)
    return count


def test_two_replicas_share_cooldowns_rows_and_budgets(tmp_path: Path) -> None:
    with postgres_server() as (pg, _), redis_server() as redis_url, \
            backend_process(name="b0", delay=0.02) as (b0, url0), backend_process(name="b1", delay=0.02) as (_, url1):
        redis_port = int(redis_url.split(":")[2].split("/")[0])
        config = scale_config(tmp_path / "c.yaml", [url0, url1], redis_port)
        store = UsageStore.open(pg)
        env = {"DELEGATE_DATABASE_URL": pg}
        with replica(config, {**env, "DELEGATE_HOME": str(tmp_path / "a")}) as (a, url_a), \
                replica(config, {**env, "DELEGATE_HOME": str(tmp_path / "b")}) as (_, url_b):
            # a burst over both replicas; one backend is killed a third of the way in
            done, statuses = asyncio.run(burst([url_a, url_b], 60, 8, during=lambda: b0.kill()))
            assert statuses.count(200) == 60, statuses  # the other deployment answered every one
            for url in (url_a, url_b):  # both replicas see the dead deployment cooling down (Redis)
                cooling = {d["id"]: d["cooldown_remaining_s"] for d in httpx.get(url + "/health").json()["deployments"]}
                assert cooling["coding#0"] and not cooling["coding#1"], (url, cooling)

            # a budgeted key used from both replicas at once is never overspent
            key, issued = KeyStore(store).create(budget_usd=0.05)
            time.sleep(1.1)  # the replicas notice that keys exist
            kdone, kstatuses = asyncio.run(burst([url_a, url_b], 30, 10, key=key))
            assert set(kstatuses) <= {200, 429} and 200 in kstatuses and 429 in kstatuses
            deadline = time.monotonic() + 20
            while (k := KeyStore(store).get(issued.key_id)) and k.reserved_usd > 1e-12 and time.monotonic() < deadline:
                time.sleep(0.2)
            spent = KeyStore(store).get(issued.key_id)
            assert spent is not None and spent.spent_usd <= 0.05 and spent.reserved_usd == pytest.approx(0, abs=1e-12)

            # one replica is sent SIGTERM in the middle of a burst: it drains, the other goes on
            ldone, lstatuses = asyncio.run(burst([url_a, url_b], 60, 8, during=lambda: a.send_signal(signal.SIGTERM)))
            assert a.wait(60) == 0
        completed = done + kdone + ldone
        assert wait_count(store, len(completed)) >= len(completed)
        rows = store.rows()
        ids = [r["request_id"] for r in rows]
        assert len(ids) == len(set(ids))  # exactly one row per request
        assert set(completed) <= set(ids)  # every completed request has its row in the one Postgres
        assert sum(r["reference_cost"] for r in rows if r["key_id"] == issued.key_id) == pytest.approx(spent.spent_usd)


@pytest.mark.parametrize("broken", ["redis", "postgres"])
def test_unreachable_redis_or_postgres_at_start_exits_2(tmp_path: Path, broken: str) -> None:
    config = scale_config(tmp_path / "c.yaml", ["http://127.0.0.1:9/v1"], refused_port() if broken == "redis" else 0)
    env = {**os.environ, "DELEGATE_HOME": str(tmp_path / "h")}
    if broken == "postgres":
        import yaml

        raw = yaml.safe_load(config.read_text())
        for key in ("redis_host", "redis_port"):
            raw["router_settings"].pop(key)
        config.write_text(yaml.safe_dump(raw))
        env["DELEGATE_DATABASE_URL"] = f"postgresql://delegate@127.0.0.1:{refused_port()}/usage"
    port = free_port()
    r = subprocess.run([sys.executable, "-m", "proxy.client.cli", "serve", "--no-backend", "--config", str(config), "--port",
                        str(port)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and ("Redis" if broken == "redis" else "Postgres") in errors[0], r.stderr


def test_redis_and_postgres_failing_later(tmp_path: Path) -> None:
    with postgres_server() as (pg, pg_ctl), backend_process(name="b0") as (_, url0):
        redis_port = free_port()
        redis = contextlib.ExitStack()
        redis.enter_context(redis_server(redis_port))
        config = scale_config(tmp_path / "c.yaml", [url0], redis_port)
        store = UsageStore.open(pg)
        key, _ = KeyStore(store).create(rpm=1000)
        with replica(config, {"DELEGATE_DATABASE_URL": pg, "DELEGATE_HOME": str(tmp_path / "h"),
                              "DELEGATE_MASTER_KEY": "sk-master"}) as (_, url):
            headers = {"authorization": f"Bearer {key}"}

            def ask(key_headers: dict[str, str] = headers) -> int:
                return httpx.post(url + "/v1/chat/completions", headers=key_headers, timeout=60,
                                  json={"model": "coding", "messages": MSG}).status_code

            redis.close()  # Redis goes away
            assert [ask() for _ in range(3)] == [200, 200, 200]
            ready = httpx.get(url + "/health/readiness")
            assert ready.status_code == 503 and "Redis" in " ".join(ready.json()["problems"])
            with redis_server(redis_port):
                deadline = time.monotonic() + 20
                while httpx.get(url + "/health/readiness").status_code != 200 and time.monotonic() < deadline:
                    time.sleep(0.3)
                assert httpx.get(url + "/health/readiness").status_code == 200
                assert wait_count(store, 3) == 3

                pg_ctl("stop")  # Postgres goes away: an issued key cannot be checked, so it is refused (fail closed);
                refused = httpx.post(url + "/v1/chat/completions", headers=headers, timeout=60,
                                     json={"model": "coding", "messages": MSG})
                assert refused.status_code == 503 and refused.headers["retry-after"]
                # the master key needs no store to be checked: it is served, and its rows wait for the store
                assert [ask({"authorization": "Bearer sk-master"}) for _ in range(4)] == [200] * 4
                deadline = time.monotonic() + 30
                while (ready := httpx.get(url + "/health/readiness")).status_code == 200 and time.monotonic() < deadline:
                    time.sleep(0.3)
                assert ready.status_code == 503 and "usage store" in " ".join(ready.json()["problems"])
                pg_ctl("start")
                assert wait_count(UsageStore.open(pg), 7, timeout=90) == 7  # the rows were kept, then written
                deadline = time.monotonic() + 30
                while httpx.get(url + "/health/readiness").status_code != 200 and time.monotonic() < deadline:
                    time.sleep(0.3)
                assert httpx.get(url + "/health/readiness").status_code == 200
