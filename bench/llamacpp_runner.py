"""llama.cpp's side of `make bench-backend`, run in the benchmark-only environment .bench/llamacpp
(llama-cpp-python built from source). Prints one JSON object.

python bench/llamacpp_runner.py MODEL.gguf THREADS speed|reference [PROMPTS.json]
"""

from __future__ import annotations

import json
import statistics
import sys
import time

import numpy as np
from llama_cpp import Llama

LONG = 1800  # tokens of context for the long-conversation decode figure


def greedy(llm: Llama, tokens: list[int], n: int) -> tuple[list[int], float, list[float]]:
    """Feed `tokens`, then `n` greedy tokens one at a time: (ids, first-token seconds, per-token seconds)."""
    llm.reset()
    start = time.perf_counter()
    llm.eval(tokens)
    out = [int(np.argmax(llm.scores[llm.n_tokens - 1]))]
    first = time.perf_counter() - start
    steps = []
    for _ in range(n - 1):
        t = time.perf_counter()
        llm.eval([out[-1]])
        out.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
        steps.append(time.perf_counter() - t)
    return out, first, steps


def main() -> None:
    model, threads, what = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    llm = Llama(model, n_ctx=2048, n_threads=threads, n_threads_batch=threads, n_batch=512, verbose=False,
                logits_all=True)
    if what == "speed":
        base = llm.tokenize(b"The history of computing is long and varied. ", add_bos=False)
        result: dict[str, object] = {}
        decode = []
        for _ in range(5):
            _, _, steps = greedy(llm, base[:8], 128)
            decode.append((len(steps)) / sum(steps))
        result["decode_tps"] = statistics.median(decode)
        _, _, steps = greedy(llm, (base * (LONG // len(base) + 1))[:LONG], 33)
        result["decode_long_tps"] = len(steps) / sum(steps)
        for n in (128, 512):
            prompt = (base * (n // len(base) + 1))[:n]
            ttfts = []
            for _ in range(3):
                _, first, _ = greedy(llm, prompt, 1)
                ttfts.append(first)
            result[f"ttft_{n}_s"] = statistics.median(ttfts)
            result[f"prefill_{n}_tps"] = n / statistics.median(ttfts)
        print(json.dumps(result))
        return
    prompts = json.load(open(sys.argv[4]))
    refs = []
    for text in prompts:
        ids = llm.tokenize(text.encode(), add_bos=False, special=True)
        out, _, _ = greedy(llm, ids, 32)
        refs.append({"prompt": ids, "continuation": out})
    print(json.dumps(refs))


if __name__ == "__main__":
    main()
