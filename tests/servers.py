"""Real servers for tests: any ASGI app under uvicorn on a free port, in a thread or a process."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import uvicorn

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def refused_port() -> int:
    """A port nothing listens on: connections to it are refused at once."""
    return free_port()


class ServerThread:
    """uvicorn serving `app` on <host>:<free port> (127.0.0.1 unless told) in a daemon thread; `http` is uvicorn's
    protocol class, where a test needs another."""

    def __init__(self, app: Any, port: int | None = None, host: str = "127.0.0.1", http: Any = "auto") -> None:
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(app, host=host, port=self.port, log_level="warning", access_log=False,
                                timeout_graceful_shutdown=2, http=http)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("test server did not start")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(60)


def wait_rows(n: int, timeout: float = 20) -> list[dict[str, Any]]:
    """The usage store's rows once there are `n` of them (rows are written in the background), or what is there."""
    from proxy.usage.store import UsageStore

    deadline = time.monotonic() + timeout
    while True:
        rows = UsageStore.open().rows()
        if len(rows) >= n or time.monotonic() > deadline:
            return rows
        time.sleep(0.1)


def wait_http(url: str, timeout: float, ok: tuple[int, ...] = (200,), proc: subprocess.Popen[Any] | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} while waiting for {url}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url, timeout=2).status_code in ok:
                return
        time.sleep(0.2)
    raise TimeoutError(f"{url} did not answer within {timeout}s")


@contextlib.contextmanager
def process(args: list[str], env: dict[str, str] | None = None, log: Path | None = None,
            python: bool = True) -> Iterator[subprocess.Popen[Any]]:
    out = open(log, "wb") if log else subprocess.DEVNULL
    proc = subprocess.Popen([sys.executable, *args] if python else args, cwd=ROOT, env={**os.environ, **(env or {})},
                            stdout=out, stderr=subprocess.STDOUT)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if log:
            out.close()  # type: ignore[union-attr]
