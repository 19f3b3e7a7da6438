"""Regenerate sampling_golden.json: what llama.cpp's own samplers leave of fixed logits, and with what probability.

    .bench/llamacpp/bin/python tests/tinygrad_backend/data/make_sampling_golden.py

Each case runs llama.cpp's sampler chain in its default order (logit_bias, penalties, top_k, top_p, min_p,
temperature) over 64 fixed logits, with the penalties fed a fixed history, and records the surviving token
ids and their probabilities (softmax of what the chain leaves). test_sampling.py checks that our sampler keeps
the same tokens with the same probabilities.
"""

from __future__ import annotations

import ctypes
import json
from pathlib import Path

import llama_cpp as L
import numpy as np

VOCAB = 64
CASES = [
    {"name": "temperature only", "temperature": 0.7},
    {"name": "top_k 5", "top_k": 5},
    {"name": "top_p 0.8", "top_p": 0.8},
    {"name": "min_p 0.1", "min_p": 0.1},
    {"name": "top_k 10 then top_p 0.5", "top_k": 10, "top_p": 0.5},
    {"name": "top_k, top_p, min_p, temperature", "top_k": 20, "top_p": 0.9, "min_p": 0.05, "temperature": 1.3},
    {"name": "repeat_penalty 1.3", "repeat_penalty": 1.3, "repeat_last_n": 8},
    {"name": "repeat_penalty, window shorter than history", "repeat_penalty": 2.0, "repeat_last_n": 3},
    {"name": "presence and frequency", "presence_penalty": 0.8, "frequency_penalty": 0.5, "repeat_last_n": 64},
    {"name": "logit_bias", "logit_bias": [[3, 5.0], [10, -100.0], [40, 2.5]]},
    {"name": "everything", "logit_bias": [[7, 1.5]], "repeat_penalty": 1.1, "repeat_last_n": 64, "presence_penalty": 0.2,
     "frequency_penalty": 0.1, "top_k": 30, "top_p": 0.95, "min_p": 0.02, "temperature": 0.8},
]


def run(case: dict, logits: np.ndarray, history: list[int]) -> tuple[list[int], list[float]]:
    chain = L.llama_sampler_chain_init(L.llama_sampler_chain_default_params())
    if case.get("logit_bias"):
        biases = (L.llama_logit_bias * len(case["logit_bias"]))(*[L.llama_logit_bias(t, b) for t, b in case["logit_bias"]])
        L.llama_sampler_chain_add(chain, L.llama_sampler_init_logit_bias(VOCAB, len(case["logit_bias"]), biases))
    penalties = L.llama_sampler_init_penalties(VOCAB, case.get("repeat_last_n", 64), case.get("repeat_penalty", 1.0),
                                               case.get("frequency_penalty", 0.0), case.get("presence_penalty", 0.0))
    L.llama_sampler_chain_add(chain, penalties)
    L.llama_sampler_chain_add(chain, L.llama_sampler_init_top_k(case.get("top_k", 0)))
    L.llama_sampler_chain_add(chain, L.llama_sampler_init_top_p(case.get("top_p", 1.0), 1))
    L.llama_sampler_chain_add(chain, L.llama_sampler_init_min_p(case.get("min_p", 0.0), 1))
    L.llama_sampler_chain_add(chain, L.llama_sampler_init_temp(case.get("temperature", 1.0)))
    for token in history:
        L.llama_sampler_accept(chain, token)
    data = (L.llama_token_data * VOCAB)(*[L.llama_token_data(i, float(v), 0.0) for i, v in enumerate(logits)])
    array = L.llama_token_data_array(data, VOCAB, -1, False)
    L.llama_sampler_apply(chain, ctypes.byref(array))
    kept = [(array.data[i].id, array.data[i].logit) for i in range(array.size)]
    L.llama_sampler_free(chain)
    z = np.array([v for _, v in kept], dtype=np.float64)
    p = np.exp(z - z.max())
    p /= p.sum()
    order = np.argsort([t for t, _ in kept])
    return [int(kept[i][0]) for i in order], [float(p[i]) for i in order]


def main() -> None:
    rng = np.random.default_rng(20261201)
    logits = rng.normal(0, 1.2, VOCAB).astype(np.float32)  # no ties
    logits[5] = -1.5  # a negative logit that is repeated: the penalty multiplies it
    history = [int(t) for t in rng.integers(0, VOCAB, 12)] + [5, 5, int(np.argmax(logits))]
    cases = []
    for case in CASES:
        kept, probs = run(case, logits, history)
        cases.append({**case, "kept": kept, "probs": probs})
    out = {"llama_cpp_python": L.__version__, "logits": [float(v) for v in logits], "history": history, "cases": cases}
    Path(__file__).with_name("sampling_golden.json").write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
