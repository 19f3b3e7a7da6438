"""make bench-scale: one replica against two, and Redis-shared router state against in-memory, in one run.

The same load (2,000 requests at concurrency 32, not streamed) goes to the fast backend directly, then
through: one replica keeping router state in memory; one replica with Redis; two replicas with Redis, the
client spreading requests over them round-robin (as a load balancer would). Same machine, same backend.
Writes requests/s and added latency (replica minus direct) to BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from bench.report import replace_section  # noqa: E402
from tests.servers import free_port, wait_http  # noqa: E402

BODY = {"model": "bench", "messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 16}


async def load(urls: list[str], total: int, concurrency: int) -> tuple[list[float], float, int]:
    latencies: list[float] = []
    errors = 0
    counter = iter(range(total))
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency)) as session:
        for url in urls:  # warm-up
            for _ in range(20):
                async with session.post(url, json=BODY) as r:
                    await r.read()

        async def worker() -> None:
            nonlocal errors
            for i in counter:
                start = time.perf_counter()
                try:
                    async with session.post(urls[i % len(urls)], json=BODY) as r:
                        await r.read()
                        ok = r.status == 200
                except aiohttp.ClientError:
                    ok = False
                if ok:
                    latencies.append((time.perf_counter() - start) * 1000)
                else:
                    errors += 1

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return latencies, time.perf_counter() - start, errors


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


@contextlib.contextmanager
def started(cmd: list[str], ready: str, env: dict[str, str] | None = None) -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, **(env or {})}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        wait_http(ready, 120, proc=proc)
        yield proc
    finally:
        proc.terminate()
        proc.wait(60)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=32)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-scale-"))
    backend_port, redis_port = free_port(), free_port()
    backend = f"http://127.0.0.1:{backend_port}/v1"
    results: dict[str, tuple[list[float], float, int]] = {}
    with contextlib.ExitStack() as stack:
        stack.enter_context(started([sys.executable, "bench/fast_backend.py", str(backend_port)], backend + "/models"))
        redis = shutil.which("redis-server")
        assert redis, "redis-server is not installed (make install installs it)"
        redis_proc = subprocess.Popen([redis, "--port", str(redis_port), "--save", "", "--appendonly", "no"],
                                      stdout=subprocess.DEVNULL)
        stack.callback(redis_proc.terminate)
        time.sleep(0.5)

        def config(name: str, with_redis: bool) -> Path:
            raw = yaml.safe_load((ROOT / "config.yaml").read_text())
            raw["model_list"] = [{"model_name": "bench", "litellm_params": {"model": "openai/fast", "api_base": backend,
                                                                            "api_key": "x"}}]
            raw["router_settings"] = {"num_retries": 0, **({"redis_host": "127.0.0.1", "redis_port": redis_port}
                                                            if with_redis else {})}
            raw["delegate"]["aliases"] = {"bench": "benchmark"}
            raw["delegate"]["backend"] = None
            for extra in ("auto", "anthropic"):  # they name the shipped aliases
                raw["delegate"].pop(extra, None)
            path = tmp / f"{name}.yaml"
            path.write_text(yaml.safe_dump(raw))
            return path

        def replicas(name: str, n: int, with_redis: bool, into: contextlib.ExitStack) -> list[str]:
            urls = []
            for i in range(n):
                port = free_port()
                into.enter_context(started(
                    [sys.executable, "-m", "proxy.client.cli", "serve", "--no-backend", "--config", str(config(name, with_redis)),
                     "--port", str(port)], f"http://127.0.0.1:{port}/health/readiness",
                    {"DELEGATE_HOME": str(tmp / f"{name}-{i}")}))
                urls.append(f"http://127.0.0.1:{port}/v1/chat/completions")
            return urls

        results["direct"] = asyncio.run(load([backend + "/chat/completions"], args.requests, args.concurrency))
        for name, n, with_redis in (("1 replica, in-memory state", 1, False), ("1 replica, Redis-shared state", 1, True),
                                    ("2 replicas, Redis-shared state", 2, True)):
            with contextlib.ExitStack() as inner:
                urls = replicas(name.replace(" ", "-").replace(",", ""), n, with_redis, inner)
                results[name] = asyncio.run(load(urls, args.requests, args.concurrency))
            print(name, f"{len(results[name][0]) / results[name][1]:.1f} req/s", flush=True)

    direct = results["direct"][0]
    lines = [
        "## Scale-out (`make bench-scale`)", "",
        f"Command: `make bench-scale` (`.venv/bin/python bench/bench_scale.py --requests {args.requests} --concurrency "
        f"{args.concurrency}`), {time.strftime('%Y-%m-%d')}, {platform.machine()} with {os.cpu_count()} CPUs: every "
        "replica, the backend (`bench/fast_backend.py`), Redis and the client share these cores, so two replicas "
        "compete for the same two CPUs. Not streamed; the client spreads requests over replicas round-robin.", "",
        "| setup | req/s | p50 ms | p99 ms | added p50 ms | added p99 ms | errors |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, (lat, wall, errors) in results.items():
        p50, p99 = pct(lat, 0.5) - pct(direct, 0.5), pct(lat, 0.99) - pct(direct, 0.99)
        added = "- | -" if name == "direct" else f"{p50:.1f} | {p99:.1f}"
        lines.append(f"| {name} | {len(lat) / wall:.1f} | {pct(lat, 0.5):.1f} | {pct(lat, 0.99):.1f} | {added} | {errors} |")
    mem, red, two = (len(results[k][0]) / results[k][1] for k in
                     ("1 replica, in-memory state", "1 replica, Redis-shared state", "2 replicas, Redis-shared state"))
    lines += ["", f"Redis-shared state costs {100 * (1 - red / mem):.0f}% of one replica's throughput; two replicas give "
                  f"{two / red:.2f}x one (on two shared cores; on separate machines each replica has its own)."]
    replace_section(ROOT / "BENCHMARKS.md", "scale", "\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
