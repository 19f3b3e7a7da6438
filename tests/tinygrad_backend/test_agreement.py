"""The tinygrad model picks llama.cpp's next token (greedy), teacher-forced on llama.cpp's own tokens.

A small version of `make bench-backend`'s agreement check; the golden file comes from
data/make_greedy_golden.py. Agreement is not exact by nature (llama.cpp dequantizes and sums in another
order), so the bar is the performance issue's: at least 95% of positions.
"""

from __future__ import annotations

import json
from pathlib import Path

from tinygrad_backend.cli import resolve_model
from tinygrad_backend.gguf_file import read_header

GOLDEN = json.loads((Path(__file__).parent / "data" / "smollm2_greedy.json").read_text())


def test_next_token_agreement_with_llama_cpp() -> None:
    from tinygrad_backend.model import Model

    model = Model(read_header(resolve_model("smollm2")[1]), 512, progress=lambda _: None)
    agree = total = 0
    for case in GOLDEN["cases"]:
        model.forget()
        seq = list(case["prompt"])
        for expected in case["continuation"]:
            agree += int(model.next_logits(seq).argmax()) == expected
            total += 1
            seq.append(expected)
    assert total >= 30
    assert agree / total >= 0.95, f"{agree}/{total}"
