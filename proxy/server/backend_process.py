"""The local tinygrad backend as a child of `delegate serve`: started before the proxy, started again
whenever it exits on its own, stopped with the proxy.

The backend exits with status 3 when its engine dies or gets stuck (tinygrad_backend/cli.py's
watchdog), and a crash exits too; either way the proxy keeps serving from the other deployments in
each chain (its health monitor has taken the backend out of rotation) until the new one answers.
"""

from __future__ import annotations

import logging
import signal
import subprocess
import sys
import threading
import time

import httpx

from proxy.settings import BackendSettings

log = logging.getLogger("delegate")
RESTART_DELAYS_S = (1.0, 2.0, 5.0, 10.0, 30.0)  # after the 1st, 2nd, ... exit in a row
STEADY_S = 300.0  # a backend that ran this long before exiting starts the count of exits again


class StartError(Exception):
    """`delegate serve` cannot start as asked (the backend, or the proxy's own port); the message says why."""


def backend_url(b: BackendSettings) -> str:
    return f"http://{b.host}:{b.port}"


def _answers(url: str) -> bool:
    try:
        httpx.get(url + "/health", timeout=1.0)
        return True
    except httpx.HTTPError:
        return False


def _command(b: BackendSettings) -> list[str]:
    cmd = [sys.executable, "-m", "tinygrad_backend", "--model", b.model, "--host", b.host, "--port", str(b.port),
           "--max-context", str(b.max_context), "--parallel", str(b.parallel)]
    if b.device:
        cmd += ["--device", b.device]
    return cmd + ["--weights", b.weights] + (["--beam", str(b.beam)] if b.beam else [])


class LocalBackend:
    """A running backend process and the thread that restarts it."""

    def __init__(self, settings: BackendSettings, proc: subprocess.Popen[bytes]) -> None:
        self.settings, self.proc = settings, proc
        self.restarts = 0
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._supervise, name="backend-supervisor", daemon=True)
        self._thread.start()

    @classmethod
    def start(cls, b: BackendSettings) -> LocalBackend | None:
        """Start the backend unless one already answers at its address (None then); wait until it answers."""
        url = backend_url(b)
        if _answers(url):
            log.info("using the tinygrad backend already running at %s", url)
            return None
        return cls(b, _spawn(b))

    def _supervise(self) -> None:
        exits_in_a_row = 0
        while True:
            started = time.monotonic()
            status = self.proc.wait()
            if self._stopping.is_set():
                return
            exits_in_a_row = 1 if time.monotonic() - started > STEADY_S else exits_in_a_row + 1
            delay = RESTART_DELAYS_S[min(exits_in_a_row, len(RESTART_DELAYS_S)) - 1]
            log.error("the tinygrad backend exited with status %s; starting it again in %.0fs", status, delay)
            if self._stopping.wait(delay):
                return
            with self._lock:
                if self._stopping.is_set():
                    return
                self.proc = subprocess.Popen(_command(self.settings))
                self.restarts += 1

    def stop(self) -> None:
        with self._lock:
            self._stopping.set()
            _terminate(self.proc)


def _spawn(b: BackendSettings) -> subprocess.Popen[bytes]:
    url = backend_url(b)
    cmd = _command(b)
    log.info("starting the tinygrad backend: %s", " ".join(cmd[1:]))
    proc = subprocess.Popen(cmd)  # its progress lines go to our stderr
    deadline = time.monotonic() + b.start_timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise StartError(f"the tinygrad backend exited with status {proc.returncode} before it answered")
        if _answers(url):
            return proc
        time.sleep(0.2)
    _terminate(proc)
    raise StartError(f"the tinygrad backend did not answer at {url} within {b.start_timeout_s:.0f}s")


def _terminate(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
