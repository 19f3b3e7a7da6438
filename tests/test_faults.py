"""Faults with real processes: backends that die, are gone, or stall; a proxy sent SIGTERM under load.

Backends here are tests/fake_backend.py run as their own processes, so they can be killed for real.
"""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from proxy.usage.store import UsageStore
from tests.conftest import write_config
from tests.servers import free_port, process, wait_http, wait_rows

MSG = [{"role": "user", "content": "hello"}]


@contextmanager
def backend_process(mode: str = "ok", delay: float = 0.0, name: str = "fake") -> Iterator[tuple[subprocess.Popen, str]]:
    port = free_port()
    with process(["-m", "tests.fake_backend", "--port", str(port), "--mode", mode, "--delay", str(delay), "--name", name]) as p:
        wait_http(f"http://127.0.0.1:{port}/v1/models", 30, proc=p)
        yield p, f"http://127.0.0.1:{port}/v1"


@contextmanager
def proxy_process(config: Path, log: Path | None = None) -> Iterator[tuple[subprocess.Popen, str]]:
    """`delegate serve --no-backend` as its own process, so it can be sent signals, once it is ready."""
    port = free_port()
    with process(["-m", "proxy.client.cli", "serve", "--no-backend", "--config", str(config), "--port", str(port)],
                 log=log) as p:
        url = f"http://127.0.0.1:{port}"
        wait_http(url + "/health/readiness", 120, proc=p)
        yield p, url


def test_backend_killed_mid_stream(tmp_path: Path, start_proxy) -> None:  # type: ignore[no-untyped-def]
    with backend_process("slow") as (backend, url):
        proxy = start_proxy(write_config(tmp_path / "c.yaml", [("coding", "openai/slow", url)]))
        lines = []
        with httpx.stream("POST", proxy.url + "/v1/chat/completions", timeout=30,
                          json={"model": "coding", "messages": MSG, "stream": True}) as r:
            for line in r.iter_lines():
                if line:
                    lines.append(line)
                if sum('"content"' in x for x in lines) == 3 and backend.poll() is None:
                    backend.send_signal(signal.SIGKILL)
    assert lines[-1] == "data: [DONE]"
    error = json.loads(lines[-2][6:])["error"]
    assert error["code"] == "stream_interrupted"  # never a truncated answer that looks complete
    assert not any('"finish_reason": "stop"' in x or '"finish_reason":"stop"' in x for x in lines)
    row = wait_rows(1)[0]
    assert row["status"] == "partial" and row["completion_tokens"] >= 3 and row["error_class"]


def test_backend_down_before_the_first_byte(tmp_path: Path, start_proxy) -> None:  # type: ignore[no-untyped-def]
    with backend_process(name="first") as (first, first_url), backend_process(name="second") as (_, second_url):
        config = write_config(tmp_path / "c.yaml", [("coding", "openai/first", first_url), ("spare", "openai/second", second_url),
                                                    ("alone", "openai/first", first_url)],
                              fallbacks={"coding": ["spare"]}, aliases=["coding", "alone"])
        proxy = start_proxy(config)
        first.kill()
        first.wait()
        for stream in (False, True):
            r = httpx.post(proxy.url + "/v1/chat/completions", json={"model": "coding", "messages": MSG, "stream": stream})
            assert r.status_code == 200 and r.headers["x-delegate-served-by"] == "openai/second"
        r = httpx.post(proxy.url + "/v1/chat/completions", json={"model": "alone", "messages": MSG})
        assert r.status_code == 503 and int(r.headers["retry-after"]) >= 1


def test_stalled_backend_times_out_then_falls_back(tmp_path: Path, start_proxy) -> None:  # type: ignore[no-untyped-def]
    with backend_process("stall") as (_, stalled), backend_process(name="spare") as (_, spare):
        config = write_config(tmp_path / "c.yaml", [("coding", "openai/stalled", stalled, {"timeout": 1, "stream_timeout": 1}),
                                                    ("spare", "openai/spare", spare)], fallbacks={"coding": ["spare"]})
        proxy = start_proxy(config)
        start = time.monotonic()
        r = httpx.post(proxy.url + "/v1/chat/completions", json={"model": "coding", "messages": MSG}, timeout=60)
        assert r.status_code == 200 and r.headers["x-delegate-served-by"] == "openai/spare"
        assert time.monotonic() - start < 30
        rows = wait_rows(1)
        assert [a["ok"] for a in rows[0]["attempts"]] == [False, True]
        assert rows[0]["attempts"][0]["error_class"] == "Timeout"


async def _load(url: str, total: int, concurrency: int) -> tuple[list[str], int]:
    """Send `total` requests, `concurrency` at a time; the request ids of those that completed, and the failures."""
    done: list[str] = []
    failed = 0
    remaining = total

    async def worker(client: httpx.AsyncClient) -> None:
        nonlocal remaining, failed
        while remaining > 0:
            remaining -= 1
            try:
                r = await client.post(url + "/v1/chat/completions", json={"model": "coding", "messages": MSG})
                if r.status_code == 200 and r.json()["choices"]:
                    done.append(r.headers["x-request-id"])
                else:
                    failed += 1
            except httpx.HTTPError:
                failed += 1

    async with httpx.AsyncClient(timeout=60) as client:
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
    return done, failed


def test_sigterm_under_load_drains_and_loses_no_row(tmp_path: Path, delegate_home: Path) -> None:
    log = tmp_path / "proxy.log"
    with (backend_process(delay=0.05) as (_, url),
          proxy_process(write_config(tmp_path / "c.yaml", [("coding", "openai/ok", url)]), log) as (proc, proxy_url)):

        async def run() -> tuple[list[str], int]:
            load = asyncio.create_task(_load(proxy_url, 300, 16))
            while UsageStore.open().count() < 60:  # mid-run
                await asyncio.sleep(0.05)
            proc.send_signal(signal.SIGTERM)
            return await load

        completed, failed = asyncio.run(run())
        proc.wait(60)
    assert proc.returncode == 0, log.read_text(errors="replace")
    assert len(completed) >= 60 and failed > 0  # the proxy did stop mid-run
    rows = UsageStore.open().rows()
    ids = [r["request_id"] for r in rows]
    assert len(ids) == len(set(ids))  # one row per request
    assert set(completed) <= set(ids)  # every request a client saw complete has its row
    assert all(r["status"] == "success" for r in rows if r["request_id"] in set(completed))


@pytest.mark.parametrize("signal_name", ["SIGTERM"])
def test_readiness_fails_while_draining(tmp_path: Path, signal_name: str) -> None:
    with (backend_process("slow") as (_, url),
          proxy_process(write_config(tmp_path / "c.yaml", [("coding", "openai/slow", url)])) as (proc, proxy_url)):
        with httpx.stream("POST", proxy_url + "/v1/chat/completions", timeout=60,
                          json={"model": "coding", "messages": MSG, "stream": True}) as r:
            lines = r.iter_lines()
            next(line for line in lines if '"content"' in line)
            proc.send_signal(getattr(signal, signal_name))
            time.sleep(0.5)
            try:
                ready = httpx.get(proxy_url + "/health/readiness", timeout=2).status_code
            except httpx.HTTPError:
                ready = None  # no longer accepting connections: as good as not ready
            assert ready in (503, None)
            rest = [line for line in lines if line]  # the stream in flight still finishes
        assert rest[-1] == "data: [DONE]" and not any('"error"' in x for x in rest)
        assert proc.wait(60) == 0
