"""The tinygrad model picks llama.cpp's next token (greedy), teacher-forced on llama.cpp's own tokens.

A small version of `make bench-backend`'s agreement check; the golden file comes from
data/make_greedy_golden.py. Agreement is not exact by nature (llama.cpp dequantizes and sums in another
order), so the bar is the performance issue's: at least 95% of positions.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pytest

from tinygrad_backend.cli import resolve_model
from tinygrad_backend.gguf_file import read_header

if TYPE_CHECKING:
    from tinygrad_backend.model import Model

GOLDEN = json.loads((Path(__file__).parent / "data" / "smollm2_greedy.json").read_text())


@pytest.fixture(scope="module")
def model() -> Model:
    from tinygrad_backend.model import Model

    return Model(read_header(resolve_model("smollm2")[1]), 512, progress=lambda _: None, slots=4)


def test_next_token_agreement_with_llama_cpp(model: Model) -> None:
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


def test_decoding_every_slot_at_once_gives_each_sequence_its_own_logits(model: Model) -> None:
    """Four prompts of different lengths decode together, each at its own position in its own KV cache row:
    every row's logits match that sequence decoded alone, and the greedy picks still agree with llama.cpp."""
    cases = GOLDEN["cases"][:4]
    assert len({len(c["prompt"]) for c in cases}) > 1
    steps = 8
    alone: list[list[np.ndarray]] = []
    model.forget()
    for slot, case in enumerate(cases):
        seq = list(case["prompt"])
        alone.append([model.next_logits(seq + case["continuation"][:k], slot) for k in range(steps)])
    model.forget()
    seqs = {slot: list(case["prompt"]) for slot, case in enumerate(cases)}
    together = [{slot: model.next_logits(seq, slot) for slot, seq in seqs.items()}]
    for k in range(1, steps):
        for slot, case in enumerate(cases):
            seqs[slot].append(case["continuation"][k - 1])
        together.append(model.step(seqs))
    agree = 0
    for slot, case in enumerate(cases):
        for k in range(steps):
            # the same arithmetic row by row (our kernels): equal, not close
            np.testing.assert_array_equal(together[k][slot], alone[slot][k])
            agree += int(together[k][slot].argmax()) == case["continuation"][k]
    assert agree / (steps * len(cases)) >= 0.9, f"{agree}/{steps * len(cases)}"


def test_prompt_chunks_padded_to_full_length_give_the_logits_of_one_token_at_a_time(model: Model) -> None:
    """A 70-token prompt goes in as chunks of 32, 32 and 6 (padded to 32): the padding must not leak into
    the logits, nor into the KV cache that later tokens read."""
    seq = [int(t) for t in np.random.default_rng(0).integers(100, 40000, 70)]
    model.forget(0)
    chunked = [model.next_logits(seq, 0), model.next_logits(seq + [42], 0)]
    model.forget(0)
    for n in range(1, len(seq)):
        model.next_logits(seq[:n], 0)  # one token per call
    one_by_one = [model.next_logits(seq, 0), model.next_logits(seq + [42], 0)]
    for a, b in zip(chunked, one_by_one, strict=True):
        np.testing.assert_array_equal(a, b)  # so a seeded sample does not depend on how the prompt was fed


def test_the_cpu_runs_our_kernels_so_the_tests_above_check_them(model: Model) -> None:
    """On the CPU `auto` means packed weights, the file's own 4-bit blocks, and our decode attention kernel
    over a half-precision KV cache: the agreement and equality checks above are of those, not of a fallback."""
    from tinygrad import dtypes

    assert model.weights == "packed"
    forward = model._forward
    assert forward.attention.available
    assert all(block.cache_kv.dtype == dtypes.half for block in forward.blocks)
    packed = getattr(forward.blocks[0], "packed", None)
    assert packed is not None and packed.qkv.bits == 4 and packed.gate_up.bits == 4
