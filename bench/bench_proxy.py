"""make bench-proxy: what the proxy adds to each request, against LiteLLM's own proxy, in one run.

The same load goes to a fast local OpenAI-compatible backend three ways: directly, through Delegate's
proxy, and through LiteLLM's proxy (`litellm --config`, from the benchmark-only environment
.bench/litellm-proxy). For each of {non-streaming, streaming} x {concurrency 1, 32} it records every
request's latency and the throughput; "added" is the proxy's figure minus the direct one.
Results go to stdout and to BENCHMARKS.md with the command that produced them.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import secrets
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from bench.report import replace_section  # noqa: E402
from tests.servers import free_port, wait_http  # noqa: E402

LITELLM_ENV = ROOT / ".bench" / "litellm-proxy"
BODY = {"model": "bench", "messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 16}


@dataclass
class Result:
    target: str
    stream: bool
    concurrency: int
    latencies_ms: list[float]
    wall_s: float
    errors: int

    def pct(self, q: float) -> float:
        xs = sorted(self.latencies_ms)
        return xs[min(len(xs) - 1, int(q * len(xs)))]

    @property
    def rps(self) -> float:
        return len(self.latencies_ms) / self.wall_s


async def _one(session: aiohttp.ClientSession, url: str, headers: dict[str, str], stream: bool) -> float:
    body = {**BODY, "stream": stream}
    start = time.perf_counter()
    async with session.post(url, json=body, headers=headers) as r:
        data = await r.read()
        if r.status != 200 or (stream and not data.rstrip().endswith(b"[DONE]")):
            raise RuntimeError(f"HTTP {r.status}: {data[:200]!r}")
    return (time.perf_counter() - start) * 1000


async def load(target: str, url: str, headers: dict[str, str], stream: bool, concurrency: int, total: int) -> Result:
    connector = aiohttp.TCPConnector(limit=concurrency, force_close=False)
    async with aiohttp.ClientSession(connector=connector) as session:
        for _ in range(20):  # warm-up: connections, JIT-ish caches, lazy imports
            await _one(session, url, headers, stream)
        latencies: list[float] = []
        errors = 0
        remaining = total

        async def worker() -> None:
            nonlocal remaining, errors
            while remaining > 0:
                remaining -= 1
                try:
                    latencies.append(await _one(session, url, headers, stream))
                except Exception:  # noqa: BLE001 - counted and reported
                    errors += 1

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return Result(target, stream, concurrency, latencies, time.perf_counter() - start, errors)


async def router_alone(config: Path, stream: bool, total: int) -> Result:
    """Our Router (built from the same config) called in this process, no HTTP server in front: the share of
    Delegate's figure that is LiteLLM's own per-call work. Sequential, like the concurrency-1 loads."""
    from proxy.server.serve import load_settings

    router, _ = load_settings(config)[1]
    body = {**BODY, "model": "bench"}

    async def one() -> float:
        start = time.perf_counter()
        if stream:
            async for _ in await router.acompletion(**body, stream=True, stream_options={"include_usage": True}):
                pass
        else:
            await router.acompletion(**body)
        return (time.perf_counter() - start) * 1000

    for _ in range(20):
        await one()
    start = time.perf_counter()
    latencies = [await one() for _ in range(total)]
    return Result("router", stream, 1, latencies, time.perf_counter() - start, 0)


def start(cmd: list[str], env: dict[str, str] | None = None, log: Path | None = None) -> subprocess.Popen[bytes]:
    out = open(log, "wb") if log else subprocess.DEVNULL
    return subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, **(env or {})}, stdout=out, stderr=subprocess.STDOUT)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--no-litellm", action="store_true", help="skip LiteLLM's proxy (not installed)")
    args = parser.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="bench-proxy-"))
    backend_port, ours_port, theirs_port = free_port(), free_port(), free_port()
    backend_url = f"http://127.0.0.1:{backend_port}/v1"
    procs = [start([sys.executable, "bench/fast_backend.py", str(backend_port)])]
    targets = {"direct": (f"{backend_url}/chat/completions", {})}
    try:
        wait_http(backend_url + "/models", 30)

        ours_config = yaml.safe_load((ROOT / "config.yaml").read_text())
        ours_config["model_list"] = [{"model_name": "bench", "litellm_params": {"model": "openai/fast", "api_base": backend_url,
                                                                                 "api_key": "unused"}}]
        ours_config["router_settings"] = {"num_retries": 0}
        ours_config["delegate"]["aliases"] = {"bench": "benchmark"}
        ours_config["delegate"]["backend"] = None
        for extra in ("auto", "anthropic"):  # they name the shipped aliases
            ours_config["delegate"].pop(extra, None)
        (tmp / "delegate.yaml").write_text(yaml.safe_dump(ours_config))
        env = {"DELEGATE_HOME": str(tmp / "home")}
        procs.append(start([sys.executable, "-m", "proxy.client.cli", "serve", "--no-backend", "--config",
                            str(tmp / "delegate.yaml"), "--port", str(ours_port)], env, tmp / "delegate.log"))
        wait_http(f"http://127.0.0.1:{ours_port}/health/readiness", 120)
        targets["delegate"] = (f"http://127.0.0.1:{ours_port}/v1/chat/completions", {})

        if not args.no_litellm:
            master = "sk-" + secrets.token_hex(24)
            (tmp / "litellm.yaml").write_text(yaml.safe_dump({
                "model_list": [{"model_name": "bench", "litellm_params": {"model": "openai/fast", "api_base": backend_url,
                                                                          "api_key": "unused"}}],
                "litellm_settings": {"drop_params": True}}))
            procs.append(start([str(LITELLM_ENV / "bin" / "litellm"), "--config", str(tmp / "litellm.yaml"), "--port",
                                str(theirs_port), "--num_workers", "1"],
                               {"LITELLM_MASTER_KEY": master, "LITELLM_LOCAL_MODEL_COST_MAP": "True",
                                "DISABLE_SCHEMA_UPDATE": "true"}, tmp / "litellm.log"))
            wait_http(f"http://127.0.0.1:{theirs_port}/health/liveliness", 180)
            targets["litellm"] = (f"http://127.0.0.1:{theirs_port}/v1/chat/completions", {"Authorization": f"Bearer {master}"})

        results: list[Result] = []
        for stream in (False, True):
            for concurrency in (1, 32):
                for name, (url, headers) in targets.items():
                    r = asyncio.run(load(name, url, headers, stream, concurrency, args.requests))
                    results.append(r)
                    print(f"{name:9s} stream={stream!s:5s} c={concurrency:2d}  p50 {r.pct(0.5):7.2f} ms  "
                          f"p99 {r.pct(0.99):7.2f} ms  {r.rps:7.1f} req/s  errors {r.errors}", flush=True)
            r = asyncio.run(router_alone(tmp / "delegate.yaml", stream, args.requests))
            results.append(r)
            print(f"router alone stream={stream!s:5s}  p50 {r.pct(0.5):7.2f} ms  p99 {r.pct(0.99):7.2f} ms", flush=True)
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(15)

    table = render(results, args.requests)
    print(table)
    replace_section(ROOT / "BENCHMARKS.md", "proxy", table)
    return 0


def render(results: list[Result], requests: int) -> str:
    by = {(r.target, r.stream, r.concurrency): r for r in results}
    lines = [
        "## Proxy overhead (`make bench-proxy`)",
        "",
        f"Command: `make bench-proxy` (`.venv/bin/python bench/bench_proxy.py --requests {requests}`), "
        f"{time.strftime('%Y-%m-%d')}, {platform.machine()} with {os.cpu_count()} CPUs, Python {platform.python_version()}. "
        "Backend: `bench/fast_backend.py` (raw ASGI under uvicorn). Client: aiohttp, keep-alive. "
        "LiteLLM's proxy: `litellm[proxy]==1.108.0`, one worker, no database. Added = proxy minus direct, same run. "
        "\"router alone\": Delegate's `litellm.Router`, built from the same config, called in the benchmark's own "
        "process with no HTTP server in front — the part of Delegate's figure that is LiteLLM's per-call work.",
        "",
        "| mode | concurrency | target | p50 ms | p99 ms | req/s | added p50 ms | added p99 ms | errors |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for stream in (False, True):
        for c in (1, 32):
            direct = by[("direct", stream, c)]
            for target in ("direct", "router", "delegate", "litellm"):
                r = by.get((target, stream, c))
                if r is None:
                    continue
                added = "" if target == "direct" else f"{r.pct(0.5) - direct.pct(0.5):.2f} | {r.pct(0.99) - direct.pct(0.99):.2f}"
                label = "router alone" if target == "router" else target
                lines.append(f"| {'stream' if stream else 'plain'} | {c} | {label} | {r.pct(0.5):.2f} | {r.pct(0.99):.2f} | "
                             f"{r.rps:.1f} | {added or '- | -'} | {r.errors} |")
    if any(k[0] == "litellm" for k in by):
        lines += ["", "Targets (Delegate against LiteLLM's proxy, same run):", ""]
        for stream in (False, True):
            for c in (1, 32):
                d, ll, base = by[("delegate", stream, c)], by[("litellm", stream, c)], by[("direct", stream, c)]
                for q, name in ((0.5, "p50"), (0.99, "p99")):
                    ours, theirs = d.pct(q) - base.pct(q), ll.pct(q) - base.pct(q)
                    ratio = ours / theirs if theirs > 0 else float("nan")
                    lines.append(f"- {'stream' if stream else 'plain'}, c={c}, added {name}: {ours:.2f} ms vs {theirs:.2f} ms "
                                 f"= {ratio:.2f}x (target <= 0.5x) {'met' if ratio <= 0.5 else 'NOT met'}")
                if c == 32:
                    ratio = d.rps / ll.rps
                    lines.append(f"- {'stream' if stream else 'plain'}, c=32, throughput: {d.rps:.0f} vs {ll.rps:.0f} req/s "
                                 f"= {ratio:.2f}x (target >= 2x) {'met' if ratio >= 2 else 'NOT met'}")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
