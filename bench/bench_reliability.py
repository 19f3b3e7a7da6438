"""make bench-reliability: nothing lost under SIGTERM, no errors and no memory growth under load.

1. 500 requests at concurrency 16 through `delegate serve`, SIGTERM in the middle: every request a client
   saw complete must have exactly one usage row after a restart.
2. 2,000 requests at concurrency 32 against a fast backend, three rounds: zero errors, and the proxy's
   resident memory sampled after each round must not keep growing.
3. Generated hostile bodies (bench/hostile_bodies.py) sent straight to the real tinygrad backend with the
   bundled model (both its APIs) and through the proxy in front of it: no 5xx for a client mistake, no
   engine death, and a plain request answers after every hundred of them.
Figures go to RELIABILITY.md with the command that produced them. (The tests run smaller versions.)
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from bench.hostile_bodies import Hostile, hostile_bodies  # noqa: E402
from bench.report import replace_section  # noqa: E402
from proxy.usage.store import UsageStore  # noqa: E402
from tests.servers import free_port, wait_http  # noqa: E402
from tests.test_faults import _load  # noqa: E402


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def config(tmp: Path, url: str, alias: str = "coding", model: str = "openai/bench", name: str = "config.yaml") -> Path:
    """The shipped config with one alias served by one deployment at `url`, and no backend of its own."""
    raw = yaml.safe_load((ROOT / "config.yaml").read_text())
    params = {"model": model, "api_base": url, **({"api_key": "x"} if model.startswith("openai/") else {})}
    raw["model_list"] = [{"model_name": alias, "litellm_params": params}]
    raw["router_settings"] = {"num_retries": 0}
    raw["delegate"]["aliases"] = {alias: "benchmark"}
    raw["delegate"]["backend"] = None
    for extra in ("auto", "anthropic"):  # they name the shipped aliases
        raw["delegate"].pop(extra, None)
    path = tmp / name
    path.write_text(yaml.safe_dump(raw))
    return path


def serve(cfg: Path, port: int, env: dict[str, str]) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen([sys.executable, "-m", "proxy.client.cli", "serve", "--no-backend", "--config", str(cfg), "--port",
                             str(port)], cwd=ROOT, env={**os.environ, **env}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    wait_http(f"http://127.0.0.1:{port}/health/readiness", 120, proc=proc)
    return proc


def sigterm_run(tmp: Path) -> dict[str, object]:
    backend_port, port = free_port(), free_port()
    backend = subprocess.Popen([sys.executable, "-m", "tests.fake_backend", "--port", str(backend_port), "--delay", "0.05"],
                               cwd=ROOT)
    home = tmp / "home-sigterm"
    env = {"DELEGATE_HOME": str(home)}
    os.environ["DELEGATE_HOME"] = str(home)
    try:
        wait_http(f"http://127.0.0.1:{backend_port}/v1/models", 30)
        cfg = config(tmp, f"http://127.0.0.1:{backend_port}/v1")
        proc = serve(cfg, port, env)

        async def run() -> tuple[list[str], int, float]:
            load = asyncio.create_task(_load(f"http://127.0.0.1:{port}", 500, 16))
            while UsageStore.open().count() < 200:
                await asyncio.sleep(0.05)
            sent = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            done, failed = await load
            proc.wait(60)
            return done, failed, time.monotonic() - sent

        completed, failed, drain_s = asyncio.run(run())
        restarted = serve(cfg, port, env)  # after a restart, the store holds what it held
        rows = UsageStore.open().rows()
        restarted.send_signal(signal.SIGTERM)
        restarted.wait(60)
    finally:
        backend.terminate()
        backend.wait(10)
    ids = [r["request_id"] for r in rows]
    return {"completed": len(completed), "failed": failed, "rows": len(ids), "duplicates": len(ids) - len(set(ids)),
            "missing": len(set(completed) - set(ids)), "exit": proc.returncode, "drain_s": drain_s}


def load_run(tmp: Path) -> dict[str, object]:
    backend_port, port = free_port(), free_port()
    backend = subprocess.Popen([sys.executable, "bench/fast_backend.py", str(backend_port)], cwd=ROOT)
    env = {"DELEGATE_HOME": str(tmp / "home-load")}
    try:
        wait_http(f"http://127.0.0.1:{backend_port}/v1/models", 30)
        proc = serve(config(tmp, f"http://127.0.0.1:{backend_port}/v1"), port, env)
        rounds = []
        for _ in range(3):
            start = time.monotonic()
            done, failed = asyncio.run(_load(f"http://127.0.0.1:{port}", 2000, 32))
            time.sleep(3)  # let the usage rows drain to the store
            rounds.append({"ok": len(done), "errors": failed, "seconds": time.monotonic() - start, "rss_mb": rss_mb(proc.pid)})
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
    finally:
        backend.terminate()
        backend.wait(10)
    return {"rounds": rounds}


PLAIN = {"messages": [{"role": "user", "content": "What is the capital of France? Answer in one word."}],
         "max_tokens": 3, "temperature": 0}


async def _hostile(base: str, bodies: list[Hostile], model: str, check_every: int = 100) -> dict[str, object]:
    """Send `bodies` four at a time; after every `check_every`, /health must say ready (when the target has it)
    and a plain request must answer."""
    statuses: dict[int, int] = {}
    server_errors: list[str] = []
    deaths = plain_failures = 0
    async with httpx.AsyncClient(timeout=300) as client:
        async def send(h: Hostile) -> None:
            try:
                r = await client.post(base + h.path, content=h.body, headers={"content-type": h.content_type})
                status = r.status_code
                text = r.text
            except httpx.HTTPError as e:
                status, text = 599, f"{type(e).__name__}: {e}"
            statuses[status] = statuses.get(status, 0) + 1
            if status >= 500:
                server_errors.append(f"{status} {h.path} {h.body[:120]!r} -> {text[:200]}")

        for start in range(0, len(bodies), check_every):
            batch = bodies[start:start + check_every]
            for i in range(0, len(batch), 4):
                await asyncio.gather(*(send(h) for h in batch[i:i + 4]))
            health = (await client.get(base + "/health")).json()
            # the backend's own /health, or the proxy's report of its deployments (the backend among them)
            if health.get("status", "ready") != "ready" or health.get("unhealthy_count", 0):
                deaths += 1
            r = await client.post(base + "/v1/chat/completions", json={"model": model, **PLAIN})
            if r.status_code != 200 or not r.json()["choices"][0]["message"]["content"]:
                plain_failures += 1
    return {"sent": len(bodies), "statuses": dict(sorted(statuses.items())), "server_errors": server_errors,
            "engine_deaths": deaths, "plain_failures": plain_failures, "checks": -(-len(bodies) // check_every)}


def hostile_run(tmp: Path, count: int) -> dict[str, dict[str, object]]:
    backend_port, port = free_port(), free_port()
    backend = subprocess.Popen([sys.executable, "-m", "tinygrad_backend", "--port", str(backend_port), "--max-context", "512"],
                               cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    backend_url = f"http://127.0.0.1:{backend_port}"
    try:
        wait_http(backend_url + "/health", 900, proc=backend)
        direct = asyncio.run(_hostile(backend_url, list(hostile_bodies(count, "smollm2", seed=1)), "smollm2"))
        assert backend.poll() is None, "the backend exited"
        cfg = config(tmp, backend_url, alias="quick", model="tinygrad/smollm2", name="hostile.yaml")
        proc = serve(cfg, port, {"DELEGATE_HOME": str(tmp / "home-hostile")})
        try:
            paths = ("/v1/chat/completions", "/v1/completions")
            proxied = asyncio.run(_hostile(f"http://127.0.0.1:{port}", list(hostile_bodies(count, "quick", seed=2, paths=paths)),
                                           "quick"))
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(60)
        direct["backend_alive"] = backend.poll() is None
    finally:
        backend.terminate()
        backend.wait(30)
    return {"straight to the backend": direct, "through the proxy": proxied}


def hostile_lines(h: dict[str, dict[str, object]], count: int) -> list[str]:
    lines = [f"### {count:,} generated hostile bodies (`bench/hostile_bodies.py`), 4 at a time", "",
             "Straight to the real tinygrad backend (bundled SmolLM2, 512-token context; OpenAI's and Ollama's routes "
             "alike), then through `delegate serve --no-backend` in front of it. After every hundred: is the engine "
             "alive (`/health`), and does a plain request answer?", "",
             "| target | sent | statuses | 5xx | engine deaths | plain request failed (of checks) |",
             "| --- | --- | --- | --- | --- | --- |"]
    for name, r in h.items():
        statuses = ", ".join(f"{k}: {v}" for k, v in r["statuses"].items())  # type: ignore[attr-defined]
        lines.append(f"| {name} | {r['sent']} | {statuses} | {len(r['server_errors'])} | {r['engine_deaths']} | "  # type: ignore[arg-type]
                     f"{r['plain_failures']} of {r['checks']} |")
    errors = [e for r in h.values() for e in r["server_errors"]]  # type: ignore[attr-defined]
    if errors:
        lines += ["", "5xx answers:", "", *[f"- `{e}`" for e in errors[:20]]]
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--hostile", type=int, default=1200, help="hostile bodies per target (default 1200)")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-reliability-"))
    h = hostile_run(tmp, args.hostile)
    print("hostile run:", h, flush=True)
    a = sigterm_run(tmp)
    print("SIGTERM run:", a, flush=True)
    b = load_run(tmp)
    print("load run:", b, flush=True)
    rss = [r["rss_mb"] for r in b["rounds"]]  # type: ignore[index]
    growth = rss[-1] - rss[1]
    lines = [
        "## Reliability (`make bench-reliability`)", "",
        f"Command: `make bench-reliability` (`.venv/bin/python bench/bench_reliability.py`), {time.strftime('%Y-%m-%d')}, "
        f"{platform.machine()} with {os.cpu_count()} CPUs. Proxy: `delegate serve --no-backend`, SQLite store.", "",
        "### SIGTERM in the middle of 500 requests at concurrency 16", "",
        f"- completed (seen by clients): {a['completed']}; refused or cut off after the signal: {a['failed']}",
        f"- usage rows after a restart: {a['rows']}; completed requests without a row: {a['missing']}; "
        f"duplicate rows: {a['duplicates']}",
        f"- proxy exit status {a['exit']}, drained in {a['drain_s']:.1f} s (bounded by uvicorn's 30 s graceful timeout)", "",
        "### 2,000 requests at concurrency 32, three rounds, fast backend (`bench/fast_backend.py`)", "",
        "| round | answered | errors | seconds | proxy RSS after (MB) |", "| --- | --- | --- | --- | --- |",
        *[f"| {i + 1} | {r['ok']} | {r['errors']} | {r['seconds']:.1f} | {r['rss_mb']:.1f} |"
          for i, r in enumerate(b["rounds"])],  # type: ignore[arg-type]
        "", f"Memory from the end of round 2 to the end of round 3: {growth:+.1f} MB "
            f"({'no steady growth' if growth < 10 else 'GROWING'}; round 1 includes start-up allocations).",
    ]
    lines += ["", *hostile_lines(h, args.hostile)]
    hostile_ok = all(not r["server_errors"] and not r["engine_deaths"] and not r["plain_failures"] for r in h.values())
    ok = a["missing"] == 0 and a["duplicates"] == 0 and all(r["errors"] == 0 for r in b["rounds"]) and hostile_ok  # type: ignore[index]
    lines.append("")
    lines.append("Result: " + ("nothing lost, no errors, no 5xx for a client mistake." if ok else
                               "FAILED: see the figures above."))
    replace_section(ROOT / "RELIABILITY.md", "reliability", "\n".join(lines))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
