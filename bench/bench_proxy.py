"""make bench-proxy: what the proxy adds to each request, against LiteLLM's own proxy, in one run.

The same load goes to a fast local OpenAI-compatible backend three ways: directly, through Delegate's
proxy, and through LiteLLM's proxy (`litellm --config`, from the benchmark-only environment
.bench/litellm-proxy). For each of {non-streaming, streaming} x {concurrency 1, 32} it records every
request's latency and the throughput; "added" is the proxy's figure minus the direct one.

Then Anthropic's Messages API (`POST /v1/messages`, as an Anthropic client sends it) through both proxies, the
same way: a Claude model a tier maps to the local alias (answered from the same backend, so "added" is against
the direct chat-completions figure), and a Claude model passed through to a fake Anthropic upstream
(bench/fake_anthropic_upstream.py; "added" is against a request straight to it).
Results go to stdout and to BENCHMARKS.md with the command that produced them.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import secrets
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from bench.fake_anthropic_upstream import KEY as UPSTREAM_KEY  # noqa: E402
from bench.report import replace_section  # noqa: E402
from tests.servers import free_port, wait_http  # noqa: E402

LITELLM_ENV = ROOT / ".bench" / "litellm-proxy"
BODY = {"model": "bench", "messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 16}
LOCAL_MODEL = "claude-haiku-4-5"  # Delegate: a tier maps it to the bench alias; LiteLLM: a model_name on the backend
CLOUD_MODEL = "claude-sonnet-4-5"  # Delegate: passed through; LiteLLM: anthropic/<model> on the fake upstream


def chat_ok(data: bytes, stream: bool) -> bool:
    return not stream or data.rstrip().endswith(b"[DONE]")


def message_ok(data: bytes, stream: bool) -> bool:
    """A whole Anthropic message with its text, or an event stream from message_start, through a text_delta, to
    message_stop."""
    if not stream:
        answer = json.loads(data)
        return answer.get("type") == "message" and any(b.get("text") for b in answer.get("content") or [])
    events = [line[5:] for line in data.splitlines() if line.startswith(b"data:")]
    return (len(events) > 2 and json.loads(events[0])["type"] == "message_start"
            and json.loads(events[-1])["type"] == "message_stop" and any(b'"text_delta"' in e for e in events))


@dataclass(frozen=True)
class Probe:
    """One kind of request: the route it measures, the body it sends, and what makes its answer right."""

    route: str  # chat | local | passthrough
    body: dict[str, Any]
    ok: Callable[[bytes, bool], bool]


CHAT = Probe("chat", BODY, chat_ok)
MESSAGE = {"max_tokens": 16, "messages": [{"role": "user", "content": "Say hello."}]}
LOCAL = Probe("local", {"model": LOCAL_MODEL, **MESSAGE}, message_ok)
PASSTHROUGH = Probe("passthrough", {"model": CLOUD_MODEL, **MESSAGE}, message_ok)


Targets = dict[str, tuple[str, dict[str, str]]]  # name -> (url, headers)


def anthropic_headers(key: str) -> dict[str, str]:
    """What an Anthropic client sends with every request."""
    return {"x-api-key": key, "anthropic-version": "2023-06-01", "content-type": "application/json"}


@dataclass
class Result:
    target: str
    stream: bool
    concurrency: int
    latencies_ms: list[float]
    wall_s: float
    errors: int
    route: str = "chat"
    error: str = ""  # the first error, when there were any

    def pct(self, q: float) -> float:
        xs = sorted(self.latencies_ms)
        return xs[min(len(xs) - 1, int(q * len(xs)))]

    @property
    def rps(self) -> float:
        return len(self.latencies_ms) / self.wall_s


async def _one(session: aiohttp.ClientSession, url: str, headers: dict[str, str], stream: bool, probe: Probe) -> float:
    body = {**probe.body, "stream": stream}
    start = time.perf_counter()
    async with session.post(url, json=body, headers=headers) as r:
        data = await r.read()
    elapsed = (time.perf_counter() - start) * 1000
    if r.status != 200 or not probe.ok(data, stream):
        raise RuntimeError(f"HTTP {r.status}: {data[:200]!r}")
    return elapsed


async def load(target: str, url: str, headers: dict[str, str], stream: bool, concurrency: int, total: int,
               probe: Probe = CHAT) -> Result:
    connector = aiohttp.TCPConnector(limit=concurrency, force_close=False)
    async with aiohttp.ClientSession(connector=connector) as session:
        for _ in range(20):  # warm-up: connections, JIT-ish caches, lazy imports
            await _one(session, url, headers, stream, probe)
        latencies: list[float] = []
        errors: list[str] = []
        remaining = total

        async def worker() -> None:
            nonlocal remaining
            while remaining > 0:
                remaining -= 1
                try:
                    latencies.append(await _one(session, url, headers, stream, probe))
                except Exception as e:  # noqa: BLE001 - counted and reported
                    errors.append(repr(e)[:300])

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return Result(target, stream, concurrency, latencies, time.perf_counter() - start, len(errors), probe.route,
                      errors[0] if errors else "")


def measure(results: list[Result], targets: Targets, probe: Probe, stream: bool, total: int) -> None:
    """Each target at concurrency 1, then 32, one after another; printed as they finish."""
    for concurrency in (1, 32):
        for name, (url, headers) in targets.items():
            r = asyncio.run(load(name, url, headers, stream, concurrency, total, probe))
            results.append(r)
            label = name if probe.route == "chat" else f"{probe.route}/{name}"
            print(f"{label:20s} stream={stream!s:5s} c={concurrency:2d}  p50 {r.pct(0.5):7.2f} ms  "
                  f"p99 {r.pct(0.99):7.2f} ms  {r.rps:7.1f} req/s  errors {r.errors}"
                  + (f"  first: {r.error}" if r.error else ""), flush=True)


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
    parser.add_argument("--markdown", type=Path, default=ROOT / "BENCHMARKS.md",
                        help="the file whose proxy section gets the table (a trial run: another file)")
    args = parser.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="bench-proxy-"))
    backend_port, ours_port, theirs_port, upstream_port = free_port(), free_port(), free_port(), free_port()
    backend_url = f"http://127.0.0.1:{backend_port}/v1"
    upstream_url = f"http://127.0.0.1:{upstream_port}"
    procs = [start([sys.executable, "bench/fast_backend.py", str(backend_port)]),
             start([sys.executable, "bench/fake_anthropic_upstream.py", str(upstream_port)])]
    targets: Targets = {"direct": (f"{backend_url}/chat/completions", {})}
    # /v1/messages: the local alias's direct figure is the backend's own (targets["direct"], the same run)
    local_targets: Targets = {}
    passthrough_targets: Targets = {"direct": (f"{upstream_url}/v1/messages", anthropic_headers(UPSTREAM_KEY))}
    try:
        wait_http(backend_url + "/models", 30)
        wait_http(upstream_url + "/", 30, ok=(404,))  # it answers POST /v1/messages alone

        ours_config = yaml.safe_load((ROOT / "config.yaml").read_text())
        ours_config["model_list"] = [{"model_name": "bench", "litellm_params": {"model": "openai/fast", "api_base": backend_url,
                                                                                 "api_key": "unused"}}]
        ours_config["router_settings"] = {"num_retries": 0}
        ours_config["delegate"]["aliases"] = {"bench": "benchmark"}
        ours_config["delegate"]["backend"] = None
        ours_config["delegate"].pop("auto", None)  # it names the shipped aliases
        (ours_config["delegate"].get("checks") or {}).pop("aliases", None)  # so do these; every_alias's stay on
        ours_config["delegate"]["anthropic"] = {"tiers": {"claude-haiku-*": "bench"}, "passthrough": True,
                                                "base_url": upstream_url}
        (tmp / "delegate.yaml").write_text(yaml.safe_dump(ours_config))
        env = {"DELEGATE_HOME": str(tmp / "home")}
        procs.append(start([sys.executable, "-m", "proxy.client.cli", "serve", "--no-backend", "--config",
                            str(tmp / "delegate.yaml"), "--port", str(ours_port)], env, tmp / "delegate.log"))
        wait_http(f"http://127.0.0.1:{ours_port}/health/readiness", 120)
        targets["delegate"] = (f"http://127.0.0.1:{ours_port}/v1/chat/completions", {})
        # an open proxy: the caller's Anthropic key is the one passed through
        local_targets["delegate"] = passthrough_targets["delegate"] = (f"http://127.0.0.1:{ours_port}/v1/messages",
                                                                       anthropic_headers(UPSTREAM_KEY))

        if not args.no_litellm:
            master = "sk-" + secrets.token_hex(24)
            backend = {"model": "openai/fast", "api_base": backend_url, "api_key": "unused"}
            (tmp / "litellm.yaml").write_text(yaml.safe_dump({
                "model_list": [{"model_name": "bench", "litellm_params": backend},
                               {"model_name": LOCAL_MODEL, "litellm_params": dict(backend)},
                               {"model_name": CLOUD_MODEL, "litellm_params": {"model": f"anthropic/{CLOUD_MODEL}",
                                                                              "api_base": upstream_url,
                                                                              "api_key": UPSTREAM_KEY}}],
                # /v1/messages for an openai/ model: its Anthropic adapter over chat completions (what the
                # backend speaks), not the default bridge to the Responses API
                "litellm_settings": {"drop_params": True, "use_chat_completions_url_for_anthropic_messages": True}}))
            procs.append(start([str(LITELLM_ENV / "bin" / "litellm"), "--config", str(tmp / "litellm.yaml"), "--port",
                                str(theirs_port), "--num_workers", "1"],
                               {"LITELLM_MASTER_KEY": master, "LITELLM_LOCAL_MODEL_COST_MAP": "True",
                                "DISABLE_SCHEMA_UPDATE": "true"}, tmp / "litellm.log"))
            wait_http(f"http://127.0.0.1:{theirs_port}/health/liveliness", 180)
            targets["litellm"] = (f"http://127.0.0.1:{theirs_port}/v1/chat/completions", {"Authorization": f"Bearer {master}"})
            local_targets["litellm"] = passthrough_targets["litellm"] = (f"http://127.0.0.1:{theirs_port}/v1/messages",
                                                                         anthropic_headers(master))

        results: list[Result] = []
        for stream in (False, True):
            measure(results, targets, CHAT, stream, args.requests)
            r = asyncio.run(router_alone(tmp / "delegate.yaml", stream, args.requests))
            results.append(r)
            print(f"router alone stream={stream!s:5s}  p50 {r.pct(0.5):7.2f} ms  p99 {r.pct(0.99):7.2f} ms", flush=True)
        for probe, probe_targets in ((LOCAL, local_targets), (PASSTHROUGH, passthrough_targets)):
            for stream in (False, True):
                measure(results, probe_targets, probe, stream, args.requests)
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(15)

    table = render(results, args.requests)
    print(table)
    replace_section(args.markdown, "proxy", table)
    return 0


Key = tuple[str, str, bool, int]  # route, target, stream, concurrency
ALL_GOALS = ("p50", "p99", "throughput")
# route, its name in the table, its direct row's, and the figures with a target (the issue's)
MESSAGE_ROUTES = (("local", "local alias", "direct (backend)", ALL_GOALS),
                  ("passthrough", "passthrough", "direct (upstream)", ("p50",)))


def _mode(stream: bool) -> str:
    return "stream" if stream else "plain"


def _cells(r: Result, direct: Result | None) -> str:
    """A row's figures, from p50 on; "added" against `direct` (none on the direct row itself)."""
    added = f"{r.pct(0.5) - direct.pct(0.5):.2f} | {r.pct(0.99) - direct.pct(0.99):.2f}" if direct else "- | -"
    return f"{r.pct(0.5):.2f} | {r.pct(0.99):.2f} | {r.rps:.1f} | {added} | {r.errors} |"


def _against(by: dict[Key, Result], route: str, base: Result, goals: tuple[str, ...], prefix: str = "") -> list[str]:
    """Delegate against LiteLLM's proxy on one route, mode and concurrency: added p50 and p99 (target <= 0.5x) and,
    at concurrency 32, throughput (target >= 2x); a figure not in `goals` is shown with no target."""
    c, mode = base.concurrency, prefix + _mode(base.stream)
    d, ll = by[(route, "delegate", base.stream, c)], by[(route, "litellm", base.stream, c)]
    lines = []
    for q, name in ((0.5, "p50"), (0.99, "p99")):
        ours, theirs = d.pct(q) - base.pct(q), ll.pct(q) - base.pct(q)
        ratio = ours / theirs if theirs > 0 else float("nan")
        verdict = f"(target <= 0.5x) {'met' if ratio <= 0.5 else 'NOT met'}" if name in goals else "(no target)"
        lines.append(f"- {mode}, c={c}, added {name}: {ours:.2f} ms vs {theirs:.2f} ms = {ratio:.2f}x {verdict}")
    if c == 32:
        ratio = d.rps / ll.rps
        verdict = f"(target >= 2x) {'met' if ratio >= 2 else 'NOT met'}" if "throughput" in goals else "(no target)"
        lines.append(f"- {mode}, c=32, throughput: {d.rps:.0f} vs {ll.rps:.0f} req/s = {ratio:.2f}x {verdict}")
    return lines


def _direct(by: dict[Key, Result], route: str, stream: bool, c: int) -> Result:
    """What a route's added figures are against: the local alias is answered by the chat-completions backend."""
    return by[("chat" if route == "local" else route, "direct", stream, c)]


def render(results: list[Result], requests: int) -> str:
    by = {(r.route, r.target, r.stream, r.concurrency): r for r in results}
    litellm = any(k[1] == "litellm" for k in by)
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
            direct = by[("chat", "direct", stream, c)]
            for target in ("direct", "router", "delegate", "litellm"):
                r = by.get(("chat", target, stream, c))
                if r is not None:
                    label = "router alone" if target == "router" else target
                    lines.append(f"| {_mode(stream)} | {c} | {label} | " + _cells(r, None if r is direct else direct))
    if litellm:
        lines += ["", "Targets (Delegate against LiteLLM's proxy, same run):", ""]
        for stream in (False, True):
            for c in (1, 32):
                lines += _against(by, "chat", by[("chat", "direct", stream, c)], ALL_GOALS)
    return "\n".join(lines + render_messages(by, litellm)) + "\n"


def render_messages(by: dict[Key, Result], litellm: bool) -> list[str]:
    lines = [
        "",
        "### Anthropic's Messages API (`/v1/messages`)",
        "",
        "Same run, load and percentiles, sent as an Anthropic client sends it (`x-api-key`, "
        "`anthropic-version: 2023-06-01`). **local alias**: `" + LOCAL_MODEL + "`, which Delegate's "
        "`delegate.anthropic.tiers` maps to the bench alias and LiteLLM's proxy has as a model_name on the same "
        "backend (`openai/fast`, with `use_chat_completions_url_for_anthropic_messages: true` so that it calls chat "
        "completions, not the Responses API); both answer through LiteLLM's Anthropic <-> OpenAI adapter, and added "
        "is against the direct chat-completions figure above. **passthrough**: `" + CLOUD_MODEL + "`, which Delegate "
        "relays to `delegate.anthropic.base_url` and LiteLLM's proxy sends through its anthropic provider (`anthropic/"
        + CLOUD_MODEL + "` with `api_base`), both to `bench/fake_anthropic_upstream.py` (raw ASGI under uvicorn; a "
        "stream's events in one write); added is against a request straight to it. Counted as an error: anything "
        "but a 200 with a message and its text, or an event stream from message_start through a text_delta to "
        "message_stop.",
        "",
        "| route | mode | concurrency | target | p50 ms | p99 ms | req/s | added p50 ms | added p99 ms | errors |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for route, name, direct_label, _ in MESSAGE_ROUTES:
        for stream in (False, True):
            for c in (1, 32):
                direct = _direct(by, route, stream, c)
                lines.append(f"| {name} | {_mode(stream)} | {c} | {direct_label} | " + _cells(direct, None))
                for target in ("delegate", "litellm"):
                    r = by.get((route, target, stream, c))
                    if r is not None:
                        lines.append(f"| {name} | {_mode(stream)} | {c} | {target} | " + _cells(r, direct))
    if litellm:
        lines += ["", "Targets (Delegate against LiteLLM's proxy, same run): the local alias as chat completions; "
                      "passthrough, added p50 <= 0.5x.", ""]
        for route, name, _, goals in MESSAGE_ROUTES:
            for stream in (False, True):
                for c in (1, 32):
                    lines += _against(by, route, _direct(by, route, stream, c), goals, f"{name}, ")
    return lines


if __name__ == "__main__":
    sys.exit(main())
