"""`delegate serve`: check the config, start the local backend, then the proxy; stop both together.

Order matters: a broken config or a port that is taken stops everything before any process starts
(exit status 2). The backend starts first and the proxy once the backend answers HTTP (it may still be
loading its model; /health/readiness says so). Ctrl-C or SIGTERM stops the proxy, which drains, and
then the backend.
"""

from __future__ import annotations

import contextlib
import gc
import ipaddress
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

from proxy.settings import BackendSettings, ConfigError, Settings
from proxy.store import StoreError, UsageStore

log = logging.getLogger("delegate")
EXIT_BAD_START = 2


class StartError(Exception):
    """The proxy cannot start as asked; the message says why."""


class _Stopped(Exception):
    """SIGTERM, after uvicorn's graceful shutdown."""


def _stop(signum: int, frame: object) -> None:
    raise _Stopped


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise StartError(f"cannot listen on {host}:{port}: {e.strerror or e}") from e
    sock.listen(2048)
    return sock


def backend_url(b: BackendSettings) -> str:
    return f"http://{b.host}:{b.port}"


def _answers(url: str) -> bool:
    try:
        httpx.get(url + "/health", timeout=1.0)
        return True
    except httpx.HTTPError:
        return False


def start_backend(b: BackendSettings) -> subprocess.Popen[bytes] | None:
    """Start the tinygrad backend unless one already answers at its address; wait until it answers."""
    url = backend_url(b)
    if _answers(url):
        log.info("using the tinygrad backend already running at %s", url)
        return None
    cmd = [sys.executable, "-m", "tinygrad_backend", "--model", b.model, "--host", b.host, "--port", str(b.port),
           "--max-context", str(b.max_context), "--parallel", str(b.parallel)]
    if b.device:
        cmd += ["--device", b.device]
    cmd += ["--weights", b.weights] + (["--beam", str(b.beam)] if b.beam else [])
    log.info("starting the tinygrad backend: %s", " ".join(cmd[1:]))
    proc = subprocess.Popen(cmd)  # its progress lines go to our stderr
    deadline = time.monotonic() + b.start_timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise StartError(f"the tinygrad backend exited with status {proc.returncode} before it answered")
        if _answers(url):
            return proc
        time.sleep(0.2)
    stop_backend(proc)
    raise StartError(f"the tinygrad backend did not answer at {url} within {b.start_timeout_s:.0f}s")


def stop_backend(proc: subprocess.Popen[bytes] | None) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def tune_collector() -> None:
    """What is loaded by now (LiteLLM's price table: ~380k objects) lives as long as the process: frozen, no
    full collection walks it again (~200 ms each, stalling every request in flight). A request makes thousands
    of short-lived objects, so the youngest generation is collected every 10,000 allocations, not 700: at 32
    concurrent requests the collector's share fell from ~0.7 ms a request to ~0.06 (BENCHMARKS.md)."""
    gc.freeze()
    gc.set_threshold(10_000, 10, 10)


def load_settings(config: Path) -> Settings:
    from proxy import settings as settings_module
    from proxy.pricing import PricingError, check_reference_model
    from proxy.router import build_router
    from proxy.shared_state import check_reachable, redis_settings

    settings = settings_module.load(config)
    build_router(settings)  # the checks that need LiteLLM, and the Router's own, before anything starts
    try:
        check_reference_model(settings.delegate.reference_model)
    except PricingError as e:
        raise ConfigError(f"delegate.reference_model: {e}") from e
    if conn := redis_settings(settings.router_settings):
        try:
            check_reachable(conn)
        except ConnectionError as e:
            raise ConfigError(f"router_settings.{conn['field']}: {e}") from e
    return settings


class _JSONLines(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return json.dumps({"time": self.formatTime(record), "level": record.levelname.lower(), "logger": record.name,
                           "message": record.getMessage()})


def serve(config: Path, host: str, port: int, with_backend: bool = True, json_logs: bool = False) -> int:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_JSONLines() if json_logs else logging.Formatter("%(asctime)s %(name)s %(message)s"))
    logging.basicConfig(level=logging.INFO, handlers=[handler])
    master_key = os.environ.get("DELEGATE_MASTER_KEY") or None
    try:
        if not is_loopback(host) and not master_key:
            raise StartError(f"refusing to listen on {host} without DELEGATE_MASTER_KEY: anyone on the network "
                             "could use it. Set the key, or bind 127.0.0.1")
        settings = load_settings(config)
        store = UsageStore.open()
        sock = bind(host, port)
        proc = start_backend(settings.delegate.backend) if with_backend and settings.delegate.backend else None
    except (ConfigError, StartError, StoreError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_START
    try:
        import uvicorn

        from proxy.app import create_app

        app = create_app(settings, master_key, store)
        tune_collector()
        server = uvicorn.Server(uvicorn.Config(app, loop="uvloop", http="httptools", log_level="warning",
                                               access_log=False, timeout_graceful_shutdown=30))
        log.info("delegate proxy on http://%s:%d/v1 (aliases: %s)", host, port, ", ".join(settings.aliases))
        # uvicorn drains on SIGINT/SIGTERM, then raises the signal again with the handler it found: make that
        # handler raise, so the default action does not kill us before the backend is stopped below
        signal.signal(signal.SIGTERM, _stop)
        with contextlib.suppress(KeyboardInterrupt, _Stopped):
            server.run(sockets=[sock])
    finally:
        stop_backend(proc)
    return 0
