from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.servers import ROOT, ServerThread, free_port, process, wait_http

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
BACKEND_CONTEXT = 512


@pytest.fixture(autouse=True)
def delegate_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test gets its own data directory and no stray keys from the environment."""
    home = tmp_path / "delegate-home"
    monkeypatch.setenv("DELEGATE_HOME", str(home))
    monkeypatch.delenv("DELEGATE_MASTER_KEY", raising=False)
    monkeypatch.delenv("DELEGATE_DATABASE_URL", raising=False)
    return home


@pytest.fixture(scope="session")
def bundled_backend(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """One real tinygrad backend with the bundled SmolLM2 for the whole session: the CPU is slow."""
    port = free_port()
    log = tmp_path_factory.mktemp("backend") / "backend.log"
    with process(["-m", "tinygrad_backend", "--port", str(port), "--max-context", str(BACKEND_CONTEXT)], log=log) as proc:
        url = f"http://127.0.0.1:{port}"
        try:
            wait_http(url + "/health", timeout=900, proc=proc)
        except Exception:
            print(log.read_text(errors="replace"))
            raise
        yield url


@contextlib.contextmanager
def postgres_server() -> Iterator[tuple[str, Callable[[str], None]]]:
    """A real PostgreSQL server from Debian's package on a free loopback port: (url, pg_ctl action)."""
    import shutil
    import subprocess
    import tempfile

    bins = sorted(Path("/usr/lib/postgresql").glob("*/bin"))
    if not bins:
        pytest.fail("PostgreSQL is not installed: `make test` installs it (apt-get install postgresql)")
    bindir = bins[-1]
    root = Path(tempfile.mkdtemp(prefix="delegate-pg-"))
    as_postgres: list[str] = []
    if os.geteuid() == 0:  # initdb refuses to run as root
        shutil.chown(root, "postgres")
        as_postgres = ["runuser", "-u", "postgres", "--"]
    port = free_port()

    def run(*args: str) -> None:
        subprocess.run([*as_postgres, *args], check=True, capture_output=True, timeout=120)

    def ctl(action: str) -> None:
        extra = ["-m", "immediate"] if action == "stop" else []
        run(str(bindir / "pg_ctl"), "-D", str(root / "data"), "-l", str(root / "log"), "-w", "-o",
            f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off", *extra, action)

    run(str(bindir / "initdb"), "-D", str(root / "data"), "-A", "trust", "-U", "delegate")
    ctl("start")
    try:
        run(str(bindir / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "delegate", "usage")
        yield f"postgresql://delegate@127.0.0.1:{port}/usage", ctl
    finally:
        with contextlib.suppress(Exception):
            ctl("stop")
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    with postgres_server() as (url, _):
        yield url


@contextlib.contextmanager
def redis_server(port: int | None = None) -> Iterator[str]:
    """A real redis-server from Debian's package on a free loopback port, nothing persisted."""
    import shutil

    binary = shutil.which("redis-server")
    if binary is None:
        pytest.fail("redis-server is not installed: `make test` installs it (apt-get install redis-server)")
    port = port or free_port()
    with process([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
                 python=False) as proc:
        import redis

        client = redis.Redis(port=port)
        deadline = time.monotonic() + 20
        while True:
            try:
                client.ping()
                break
            except redis.RedisError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        yield f"redis://127.0.0.1:{port}/0"


def shipped_config(path: Path, backend_url: str, backend: dict[str, Any] | None = None) -> Path:
    """The shipped config.yaml with Ollama on a port where nothing listens (a machine that runs Ollama answers
    the same) and the tinygrad deployments pointed at `backend_url`."""
    from tests.servers import refused_port

    text = (ROOT / "config.yaml").read_text()
    text = text.replace("http://127.0.0.1:11434", f"http://127.0.0.1:{refused_port()}")
    text = text.replace("http://127.0.0.1:8001", backend_url)
    raw = yaml.safe_load(text)
    raw["delegate"]["backend"] = backend
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.fixture(scope="module")
def real_proxy(bundled_backend: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The real proxy with the shipped config in front of the shared bundled backend."""
    from proxy import settings
    from proxy.server.app import create_app
    from proxy.usage.store import UsageStore

    tmp = tmp_path_factory.mktemp("real-proxy")
    app = create_app(settings.load(shipped_config(tmp / "config.yaml", bundled_backend)), None,
                     UsageStore.open(f"sqlite:///{tmp / 'usage.db'}"))
    with ServerThread(app) as server:
        yield server.url


def write_config(path: Path, deployments: list[tuple[Any, ...]], fallbacks: dict[str, list[str]] | None = None,
                 aliases: list[str] | None = None, router: dict[str, Any] | None = None,
                 delegate: dict[str, Any] | None = None, context_fallbacks: dict[str, list[str]] | None = None) -> Path:
    """A config.yaml for tests: deployments are (model_name, provider/model, api_base[, extra litellm_params])."""
    model_list = []
    for name, model, api_base, *extra in deployments:
        params: dict[str, Any] = {"model": model, **(extra[0] if extra else {})}
        if api_base:
            params["api_base"] = api_base
        if model.startswith("openai/"):
            params["api_key"] = "sk-test"
        model_list.append({"model_name": name, "litellm_params": params, "model_info": {"power_watts": 100}})
    groups = list(dict.fromkeys(d[0] for d in deployments))
    config = {
        "model_list": model_list,
        "router_settings": {"num_retries": 0, "allowed_fails": 1, "cooldown_time": 30, "timeout": 30,
                            "fallbacks": [{k: v} for k, v in (fallbacks or {}).items()],
                            "context_window_fallbacks": [{k: v} for k, v in (context_fallbacks or {}).items()],
                            **(router or {})},
        "litellm_settings": {"drop_params": True},
        "delegate": {"aliases": {a: f"the {a} alias" for a in (aliases or groups[:1])}, "backend": None,
                     **(delegate or {})},
    }
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


@pytest.fixture
def start_proxy(tmp_path: Path) -> Iterator[Callable[..., ServerThread]]:
    """Start the real proxy app under uvicorn for a config written by write_config."""
    stack = contextlib.ExitStack()

    def start(config: Path, master_key: str | None = None) -> ServerThread:
        from proxy import settings
        from proxy.server.app import create_app

        app = create_app(settings.load(config), master_key)
        return stack.enter_context(ServerThread(app))

    with stack:
        yield start


@pytest.fixture
def fake_backend() -> Iterator[Callable[..., Any]]:
    """Start FakeBackend servers; returns (backend, url)."""
    from tests.fake_backend import FakeBackend

    stack = contextlib.ExitStack()

    def start(name: str, **kwargs: Any) -> tuple[FakeBackend, str]:
        backend = FakeBackend(name, **kwargs)
        server = stack.enter_context(ServerThread(backend.app))
        return backend, server.url + "/v1"

    with stack:
        yield start


__all__ = ["ROOT", "write_config"]
