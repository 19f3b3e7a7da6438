"""`delegate serve`: check the config, start the local backend, then the proxy; stop both together.

Order matters: a broken config or a port that is taken stops everything before any process starts
(exit status 2). The backend starts first and the proxy once the backend answers HTTP (it may still be
loading its model; /health/readiness says so), and is started again whenever it exits on its own
(backend_process.py). Ctrl-C or SIGTERM stops the proxy, which drains, and then the backend.
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import os
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from proxy.server.backend_process import LocalBackend, StartError
from proxy.settings import ConfigError, Settings
from proxy.usage.store import StoreError, UsageStore
from serving.listen import ListenError, bind, is_loopback

if TYPE_CHECKING:
    import uvicorn

    from proxy.routing.router import Routing

log = logging.getLogger("delegate")
EXIT_BAD_START = 2


class _Stopped(Exception):
    """SIGTERM, after uvicorn's graceful shutdown."""


def _stop(signum: int, frame: object) -> None:
    raise _Stopped


def tune_collector() -> None:
    """What is loaded by now (LiteLLM's price table: ~380k objects) lives as long as the process: frozen, no
    full collection walks it again (~200 ms each, stalling every request in flight). A request makes thousands
    of short-lived objects, so the youngest generation is collected every 10,000 allocations, not 700: at 32
    concurrent requests the collector's share fell from ~0.7 ms a request to ~0.06 (BENCHMARKS.md)."""
    gc.freeze()
    gc.set_threshold(10_000, 10, 10)


def load_settings(config: Path) -> tuple[Settings, Routing]:
    """The config, checked, and the Router built from it: the one the proxy then serves with (built once)."""
    from proxy import settings as settings_module
    from proxy.routing.router import build_router
    from proxy.routing.shared_state import check_reachable, redis_settings
    from proxy.usage.pricing import PricingError, check_reference_model

    settings = settings_module.load(config)
    routing = build_router(settings)  # the checks that need LiteLLM, and the Router's own, before anything starts
    try:
        check_reference_model(settings.delegate.reference_model)
    except PricingError as e:
        raise ConfigError(f"delegate.reference_model: {e}") from e
    if conn := redis_settings(settings.router_settings):
        try:
            check_reachable(conn)
        except ConnectionError as e:
            raise ConfigError(f"router_settings.{conn['field']}: {e}") from e
    return settings, routing


def server_config(app: Any, settings: Settings) -> uvicorn.Config:
    """How `delegate serve` runs the app: uvloop, httptools with a header timeout (slowloris), a 30 s drain."""
    import uvicorn

    from serving.header_timeout import with_header_timeout

    return uvicorn.Config(app, loop="uvloop", http=with_header_timeout(settings.delegate.header_timeout_s),
                          log_level="warning", access_log=False, timeout_graceful_shutdown=30)


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
        settings, routing = load_settings(config)
        store = UsageStore.open()
        sock = bind(host, port, backlog=2048)
        backend = LocalBackend.start(settings.delegate.backend) if with_backend and settings.delegate.backend else None
    except (ConfigError, StartError, StoreError, ListenError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_START
    try:
        import uvicorn

        from proxy.server.app import create_app

        app = create_app(settings, master_key, store, routing)
        tune_collector()
        server = uvicorn.Server(server_config(app, settings))
        log.info("delegate proxy on http://%s:%d/v1 (aliases: %s)", host, port, ", ".join(settings.aliases))
        # uvicorn drains on SIGINT/SIGTERM, then raises the signal again with the handler it found: make that
        # handler raise, so the default action does not kill us before the backend is stopped below
        signal.signal(signal.SIGTERM, _stop)
        with contextlib.suppress(KeyboardInterrupt, _Stopped):
            server.run(sockets=[sock])
    finally:
        if backend is not None:
            backend.stop()
    return 0
