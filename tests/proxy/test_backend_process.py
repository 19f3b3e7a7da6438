"""`delegate serve` starts the real tinygrad backend again when it exits on its own (a crash, or its
watchdog's exit after the engine died or got stuck), and stops it with itself."""

from __future__ import annotations

import os
import signal
import time

import httpx

from proxy.server.backend_process import LocalBackend, backend_url
from proxy.settings import BackendSettings
from tests.servers import free_port


def _answers(url: str) -> bool:
    try:
        return httpx.get(url + "/health", timeout=2).status_code in (200, 503)
    except httpx.HTTPError:
        return False


def test_a_backend_that_dies_is_started_again_and_stopped_with_the_proxy() -> None:
    settings = BackendSettings(port=free_port(), max_context=64, parallel=1)
    backend = LocalBackend.start(settings)
    assert backend is not None
    url = backend_url(settings)
    try:
        first = backend.proc
        os.kill(first.pid, signal.SIGKILL)
        deadline = time.monotonic() + 120
        while not (backend.restarts == 1 and backend.proc is not first and _answers(url)):
            assert time.monotonic() < deadline, "the backend was not started again"
            time.sleep(0.2)
    finally:
        backend.stop()
    assert backend.proc.poll() is not None and not _answers(url)
    time.sleep(1.5)  # longer than the first restart delay: a stopped backend stays stopped
    assert backend.restarts == 1
