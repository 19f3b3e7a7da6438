"""make bench-backend: the tinygrad backend against llama.cpp on the same GGUF, threads and machine.

Measured in one run, for both where it applies:
  decode tokens/s (median of 5 runs of 128 greedy tokens), and for ours one decode step split into time in
  kernels and host time (the rest: Python, dispatch); decode tokens/s as a client sees it over
  HTTP streaming; prefill tokens/s and time to first token for
  128- and 512-token prompts, warm; start-up to ready, with tinygrad's kernel cache empty and filled;
  aggregate tokens/s and p95 time to first token at 1, 2 and 4 concurrent requests through the HTTP
  server; peak resident memory; effective memory bandwidth (bytes read per token x tokens/s) against the
  machine's measured bandwidth; and next-token agreement with llama.cpp, teacher-forced on llama.cpp's
  greedy tokens, over 20 prompts x 32 tokens.
Writes its table, with the command, to BENCHMARKS.md, headed by a fixed pure-Python loop's time, so a reader
can tell a slow host's Python from a slow backend. Not a test: nothing here asserts a time.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from bench.constrained_decoding import constrained_decoding, render_constrained  # noqa: E402
from bench.host_timing import KernelClock, python_loop_ms  # noqa: E402
from bench.report import replace_section  # noqa: E402
from tests.servers import free_port, wait_http  # noqa: E402
from tinygrad_backend.cli import resolve_model  # noqa: E402

LLAMA_ENV = ROOT / ".bench" / "llamacpp"
THREADS = os.cpu_count() or 1
AGREEMENT_PROMPTS = [
    "What is the capital of France? Answer in one word.", "Write a Python function that reverses a string.",
    "Explain recursion to a child.", "List three prime numbers.", "Translate 'good morning' into Spanish.",
    "Summarize: the build failed twice, then passed after a cache reset.", "What does HTTP stand for?",
    "Give me a haiku about the sea.", "How do I sort a list in Python?", "Name a color of the rainbow.",
    "What is 12 times 12?", "Describe a cat in one sentence.", "What is the boiling point of water?",
    "Write a SQL query that counts rows in a table named users.", "Why is the sky blue?",
    "Suggest a name for a pet goldfish.", "What is the opposite of hot?", "Write a limerick about a programmer.",
    "What language is spoken in Brazil?", "Explain what a unit test is.",
]


LONG = 1800  # tokens of context for the long-conversation decode figure, as bench/llamacpp_runner.py's


def chat_prompt(text: str) -> str:
    return (f"<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
            f"<|im_start|>user\n{text}<|im_end|>\n<|im_start|>assistant\n")


def llamacpp(model: Path, *args: str) -> object:
    out = subprocess.run([str(LLAMA_ENV / "bin" / "python"), "bench/llamacpp_runner.py", str(model), str(THREADS), *args],
                         cwd=ROOT, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def machine_bandwidth_gbs() -> float:
    a = np.ones(64 * 1024 * 1024 // 8)  # 64 MiB, past every cache
    b = np.empty_like(a)
    best = 0.0
    for _ in range(10):
        t = time.perf_counter()
        np.copyto(b, a)
        best = max(best, 2 * a.nbytes / (time.perf_counter() - t) / 1e9)  # read + write
    return best


# --- tinygrad, in process ------------------------------------------------------------------------------

def ours_in_process(model_path: Path, weights: str) -> dict[str, float]:
    from tinygrad import GlobalCounters

    from tinygrad_backend.gguf_file import read_header
    from tinygrad_backend.model import Model
    from tinygrad_backend.tokenizer import GGUFTokenizer

    header = read_header(model_path)
    tok = GGUFTokenizer(header.metadata)
    clock = KernelClock()
    model = Model(header, 2048, progress=lambda s: None, weights=weights)
    model.warm_up(progress=lambda s: None)
    base = tok.encode("The history of computing is long and varied. ")
    result: dict[str, float] = {}
    decode = []
    for _ in range(5):
        model.forget()
        seq = base[:8]
        seq.append(int(model.next_logits(seq).argmax()))
        start = time.perf_counter()
        for _ in range(127):
            seq.append(int(model.next_logits(seq).argmax()))
        decode.append(127 / (time.perf_counter() - start))
    result["decode_tps"] = statistics.median(decode)
    # one decode step: wall, kernels (timed in C by our step runner, or from tinygrad's CPU queue with
    # DELEGATE_STEP_RUNNER=0, which the clock slows a little), host
    if model.info.device == "CPU":
        walls, kernels = [], []
        clock.on = True
        for _ in range(64):
            clock.busy()
            start = time.perf_counter()
            seq.append(int(model.next_logits(seq).argmax()))
            walls.append(time.perf_counter() - start)
            kernels.append(clock.busy())
        clock.on = False
        result["step_wall_ms"] = statistics.median(walls) * 1000
        result["step_kernels_ms"] = statistics.median(kernels) * 1000
        result["step_host_ms"] = statistics.median(w - k for w, k in zip(walls, kernels, strict=True)) * 1000
    model.forget()
    seq = (base * (LONG // len(base) + 1))[:LONG]  # far into a conversation: attention reads the whole cache
    seq.append(int(model.next_logits(seq).argmax()))
    start = time.perf_counter()
    for _ in range(32):
        seq.append(int(model.next_logits(seq).argmax()))
    result["decode_long_tps"] = 32 / (time.perf_counter() - start)
    GlobalCounters.reset()
    seq.append(int(model.next_logits(seq).argmax()))
    result["bytes_per_token"] = GlobalCounters.global_mem
    for n in (128, 512):
        prompt = (base * (n // len(base) + 1))[:n]
        ttfts = []
        for _ in range(3):
            model.forget()
            start = time.perf_counter()
            model.next_logits(prompt)
            ttfts.append(time.perf_counter() - start)
        result[f"ttft_{n}_s"] = statistics.median(ttfts)
        result[f"prefill_{n}_tps"] = n / statistics.median(ttfts)
    return result


def agreement(model_path: Path, weights: str) -> tuple[int, int]:
    from tinygrad_backend.gguf_file import read_header
    from tinygrad_backend.model import Model

    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump([chat_prompt(p) for p in AGREEMENT_PROMPTS], f)
    refs = llamacpp(model_path, "reference", f.name)
    model = Model(read_header(model_path), 2048, progress=lambda s: None, weights=weights)
    agree = total = 0
    for ref in refs:  # type: ignore[attr-defined]
        model.forget()
        seq = list(ref["prompt"])
        for expected in ref["continuation"]:
            agree += int(model.next_logits(seq).argmax()) == expected
            total += 1
            seq.append(expected)  # teacher-forced: llama.cpp's token, whatever ours was
    return agree, total


# --- servers ---------------------------------------------------------------------------------------------

def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


PARALLEL = 4  # the backend's default --parallel: generations decoded together


def start_ours(port: int, env: dict[str, str], weights: str, beam: int) -> tuple[subprocess.Popen[bytes], float]:
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "tinygrad_backend", "--port", str(port), "--max-context", "2048",
                             "--weights", weights, "--beam", str(beam), "--parallel", str(PARALLEL)],
                            cwd=ROOT, env={**os.environ, **env},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_http(f"http://127.0.0.1:{port}/health", 1800, proc=proc)
    return proc, time.perf_counter() - start


def start_llamacpp(model: Path, port: int) -> tuple[subprocess.Popen[bytes], float]:
    start = time.perf_counter()
    proc = subprocess.Popen([str(LLAMA_ENV / "bin" / "python"), "-m", "llama_cpp.server", "--model", str(model), "--port",
                             str(port), "--n_threads", str(THREADS), "--n_ctx", "2048", "--model_alias", "smollm2"],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_http(f"http://127.0.0.1:{port}/v1/models", 600, proc=proc)
    return proc, time.perf_counter() - start


async def streamed_decode_tps(url: str, tokens: int = 128) -> float:
    """One streaming request, as a client sees it: tokens after the first over the time after the first."""
    body = {"model": "smollm2", "stream": True, "max_tokens": tokens, "temperature": 0,
            "messages": [{"role": "user", "content": "Write a long story about a dragon."}]}
    stamps = []
    async with httpx.AsyncClient(timeout=600) as client, client.stream("POST", url + "/v1/chat/completions", json=body) as r:
        async for line in r.aiter_lines():
            if line.startswith("data: {") and '"content"' in line and '"content": ""' not in line:
                stamps.append(time.perf_counter())
    return (len(stamps) - 1) / (stamps[-1] - stamps[0]) if len(stamps) > 1 else 0.0


async def concurrent(url: str, n: int, tokens: int = 64) -> tuple[float, float]:
    """`n` streaming requests at once: aggregate tokens/s and p95 time to first token."""
    async def one(client: httpx.AsyncClient, i: int) -> tuple[float, int]:
        body = {"model": "smollm2", "stream": True, "max_tokens": tokens, "temperature": 0,
                "messages": [{"role": "user", "content": f"Write a long story about dragon number {i}."}]}
        start, first, count = time.perf_counter(), None, 0
        async with client.stream("POST", url + "/v1/chat/completions", json=body) as r:
            async for line in r.aiter_lines():
                if line.startswith("data: {") and '"content"' in line and '"content": ""' not in line:
                    first = first or time.perf_counter() - start
                    count += 1
        return first or 0.0, count

    async with httpx.AsyncClient(timeout=600) as client:
        start = time.perf_counter()
        results = await asyncio.gather(*(one(client, i) for i in range(n)))
        wall = time.perf_counter() - start
    ttfts = sorted(r[0] for r in results)
    return sum(r[1] for r in results) / wall, ttfts[min(len(ttfts) - 1, int(0.95 * len(ttfts)))]


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--weights", default="auto", help="the backend's --weights setting to measure")
    parser.add_argument("--beam", type=int, default=0, help="the backend's --beam setting to measure")
    args = parser.parse_args()
    if args.beam:
        os.environ["JITBEAM"] = str(args.beam)  # before tinygrad is imported, for the in-process part
    model_path = resolve_model("smollm2")[1]
    rows: dict[str, dict[str, object]] = {"tinygrad": {}, "llama.cpp": {}}
    bandwidth = machine_bandwidth_gbs()
    python_ms = python_loop_ms()

    rows["llama.cpp"].update(llamacpp(model_path, "speed"))  # type: ignore[arg-type]
    ours = ours_in_process(model_path, args.weights)
    rows["tinygrad"].update(ours)
    agree, total = agreement(model_path, args.weights)
    constrained = constrained_decoding(model_path, args.weights, chat_prompt)
    print(json.dumps(rows, indent=1), flush=True)

    cold_cache = Path(tempfile.mkdtemp()) / "cache.db"
    for label, env in (("cold", {"CACHEDB": str(cold_cache)}), ("warm", {"CACHEDB": str(cold_cache)})):
        port = free_port()
        proc, ready_s = start_ours(port, env, args.weights, args.beam)
        rows["tinygrad"][f"ready_{label}_s"] = ready_s
        if label == "warm":
            rows["tinygrad"]["streamed_decode_tps"] = asyncio.run(streamed_decode_tps(f"http://127.0.0.1:{port}"))
            for n in (1, 2, 4):
                tps, p95 = asyncio.run(concurrent(f"http://127.0.0.1:{port}", n))
                rows["tinygrad"][f"c{n}_tps"], rows["tinygrad"][f"c{n}_p95_ttft_s"] = tps, p95
            rows["tinygrad"]["peak_rss_mb"] = peak_rss_mb(proc.pid)
        proc.terminate()
        proc.wait(30)
    port = free_port()
    proc, ready_s = start_llamacpp(model_path, port)
    rows["llama.cpp"]["ready_warm_s"] = rows["llama.cpp"]["ready_cold_s"] = ready_s
    rows["llama.cpp"]["streamed_decode_tps"] = asyncio.run(streamed_decode_tps(f"http://127.0.0.1:{port}"))
    for n in (1, 2, 4):
        try:
            tps, p95 = asyncio.run(concurrent(f"http://127.0.0.1:{port}", n))
            rows["llama.cpp"][f"c{n}_tps"], rows["llama.cpp"][f"c{n}_p95_ttft_s"] = tps, p95
        except httpx.HTTPError as e:  # llama-cpp-python's server is known to drop concurrent streams
            rows["llama.cpp"][f"c{n}_error"] = f"{type(e).__name__}: {e}"
            if proc.poll() is not None:
                proc, _ = start_llamacpp(model_path, port := free_port())
    rows["llama.cpp"]["peak_rss_mb"] = peak_rss_mb(proc.pid)
    proc.terminate()
    proc.wait(30)

    table = render(rows, bandwidth, agree, total, f"{args.weights} --beam {args.beam}", model_path, python_ms)
    table += render_constrained(constrained)
    print(table)
    replace_section(ROOT / "BENCHMARKS.md", f"backend-{args.weights}-beam{args.beam}", table)
    return 0


def render(rows: dict[str, dict[str, object]], bandwidth: float, agree: int, total: int, weights: str, model: Path,
           python_ms: float) -> str:
    t, ll = rows["tinygrad"], rows["llama.cpp"]

    def f(v: object, fmt: str = "{:.1f}") -> str:
        return fmt.format(v) if isinstance(v, int | float) else "-"

    bpt = float(t["bytes_per_token"])  # type: ignore[arg-type]
    lines = [
        f"## TinyGrad backend against llama.cpp (`make bench-backend`, --weights {weights})", "",
        f"Command: `make bench-backend` (`.venv/bin/python bench/bench_backend.py --weights {weights}`), "
        f"{time.strftime('%Y-%m-%d')}, {platform.machine()} with {THREADS} CPUs, both on {THREADS} threads. "
        f"Model: `{model.name}` (the bundled SmolLM2-135M-Instruct). llama.cpp: llama-cpp-python built from source "
        f"(`.bench/llamacpp`), its server for the HTTP rows. tinygrad 0.13.0, device CPU; the HTTP rows run our "
        f"server with `--parallel {PARALLEL}` (its default).", "",
        f"Host speed: a fixed pure-Python loop (1,000,000 additions, `python_loop_ms` in bench/host_timing.py) took "
        f"{python_ms:.0f} ms.", "",
        "| measure | tinygrad | llama.cpp | ratio |", "| --- | --- | --- | --- |",
    ]

    def row(name: str, key: str, fmt: str = "{:.1f}", higher_better: bool = True) -> None:
        a, b = t.get(key), ll.get(key)
        both = isinstance(a, float | int) and isinstance(b, float | int) and a and b
        ratio = (a / b if higher_better else b / a) if both else None  # type: ignore[operator]
        lines.append(f"| {name} | {f(a, fmt)} | {f(b, fmt)} | {f(ratio, '{:.2f}x')} |")

    row("decode tokens/s (128 tokens, greedy, median of 5)", "decode_tps")
    row("one decode step: wall time (ms)", "step_wall_ms", "{:.2f}", higher_better=False)
    row("one decode step: time in kernels (ms)", "step_kernels_ms", "{:.2f}", higher_better=False)
    row("one decode step: host time, wall minus kernels (ms)", "step_host_ms", "{:.2f}", higher_better=False)
    row("decode tokens/s over HTTP streaming (one client, 128 tokens)", "streamed_decode_tps")
    row(f"decode tokens/s {LONG:,} tokens into a conversation (32 greedy tokens)", "decode_long_tps")
    row("prefill tokens/s, 128-token prompt", "prefill_128_tps")
    row("time to first token, 128-token prompt (s)", "ttft_128_s", "{:.3f}", higher_better=False)
    row("prefill tokens/s, 512-token prompt", "prefill_512_tps")
    row("time to first token, 512-token prompt (s)", "ttft_512_s", "{:.3f}", higher_better=False)
    row("start to ready, kernel cache empty (s)", "ready_cold_s", "{:.1f}", higher_better=False)
    row("start to ready, kernel cache filled (s)", "ready_warm_s", "{:.1f}", higher_better=False)
    for n in (1, 2, 4):
        row(f"aggregate tokens/s, {n} concurrent (HTTP)", f"c{n}_tps")
        row(f"p95 time to first token, {n} concurrent (s)", f"c{n}_p95_ttft_s", "{:.2f}", higher_better=False)
    row("peak resident memory (MB)", "peak_rss_mb", "{:.0f}", higher_better=False)
    decode = float(t["decode_tps"])  # type: ignore[arg-type]
    lines += [
        "", f"Effective bandwidth of the tinygrad decode step: {bpt / 1e9:.3f} GB read per token x {decode:.1f} tokens/s = "
        f"{bpt * decode / 1e9:.2f} GB/s, against {bandwidth:.1f} GB/s measured on this machine (numpy copy of 64 MiB).",
        f"Next-token agreement with llama.cpp, teacher-forced on its greedy tokens: {agree}/{total} = "
        f"{100 * agree / total:.1f}% over {len(AGREEMENT_PROMPTS)} prompts x 32 tokens (target >= 95%).",
        *[f"llama.cpp at {k[1]} concurrent: failed, {v}" for k, v in ll.items() if k.endswith("_error")],
        "",
        "Targets (issue 14), as ratios from this run: " + "; ".join(_targets(t, ll, agree / total)) + ".",
    ]
    return "\n".join(lines) + "\n"


def _targets(t: dict[str, object], ll: dict[str, object], agreement: float) -> list[str]:
    def ratio(a: object, b: object) -> float:
        return float(a) / float(b) if isinstance(a, int | float) and isinstance(b, int | float) and b else float("nan")  # type: ignore[arg-type]

    checks = [
        ("decode >= 0.8x llama.cpp's", ratio(t.get("decode_tps"), ll.get("decode_tps")), 0.8),
        ("decode over HTTP streaming >= 0.7x llama.cpp's decode", ratio(t.get("streamed_decode_tps"), ll.get("decode_tps")), 0.7),
        ("4 concurrent >= 2.5x one", ratio(t.get("c4_tps"), t.get("c1_tps")), 2.5),
    ]
    out = [f"{name}: {'met' if value >= goal else 'not met'} ({value:.2f}x)" for name, value, goal in checks]
    mem = ratio(t.get("peak_rss_mb"), ll.get("peak_rss_mb"))
    out.append(f"peak memory <= 1.5x llama.cpp's: {'met' if mem <= 1.5 else 'not met'} ({mem:.2f}x)")
    out.append(f"next-token agreement >= 95%: {'met' if agreement >= 0.95 else 'not met'} ({100 * agreement:.1f}%)")
    host = t.get("step_host_ms")
    if isinstance(host, float):
        out.append(f"host share of a decode step < 1 ms: {'met' if host < 1 else 'not met'} ({host:.2f} ms)")
    return out


if __name__ == "__main__":
    sys.exit(main())
