from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tinygrad_backend.sampling import (
    SamplingParams,
    StopMatcher,
    candidates,
    nucleus,
    pick_token,
    shape_logits,
    token_logprobs,
)


def test_greedy_takes_the_largest_logit() -> None:
    logits = np.array([0.1, 3.0, 2.9, -1.0])
    assert pick_token(logits, SamplingParams(temperature=0), np.random.default_rng(0)) == 1


def test_same_seed_same_draws() -> None:
    logits = np.linspace(0, 1, 50)
    params = SamplingParams(temperature=1.0, seed=7)
    draws = [[pick_token(logits, params, rng) for _ in range(20)] for rng in (np.random.default_rng(7), np.random.default_rng(7))]
    assert draws[0] == draws[1]
    assert len(set(draws[0])) > 1  # it does sample


def test_top_p_keeps_only_the_nucleus() -> None:
    logits = np.array([10.0, 9.0, -10.0, -10.0])  # the last two carry almost no mass
    rng = np.random.default_rng(0)
    picks = {pick_token(logits, SamplingParams(temperature=1.0, top_p=0.9), rng) for _ in range(200)}
    assert picks <= {0, 1}


@pytest.mark.parametrize("temperature", [0.3, 1.0, 5.0, 100.0])  # peaked to nearly flat: k grows to the vocabulary
@pytest.mark.parametrize("top_p", [0.1, 0.5, 0.9, 0.999])
def test_nucleus_is_what_sorting_the_whole_vocabulary_gives(temperature: float, top_p: float) -> None:
    rng = np.random.default_rng(int(temperature * 10 + top_p * 1000))
    logits = rng.normal(0, 3, 49152) / temperature
    logits[rng.integers(0, len(logits), 50)] = logits.max()  # ties at the top, broken by token id
    probs = np.exp(logits - logits.max())
    probs /= probs.sum()
    order = np.lexsort((np.arange(len(probs)), -probs))
    expected = order[: int(np.searchsorted(np.cumsum(probs[order]), top_p)) + 1]
    assert nucleus(probs, top_p).tolist() == expected.tolist()


@pytest.mark.parametrize(("pieces", "stops", "sent", "hit"), [
    (["Hello", " wor", "ld"], ("world",), "Hello ", True),
    (["a", "b", "c"], ("x",), "abc", False),
    (["Par", "is.", "\n\nMore"], ("\n\n",), "Paris.", True),
    (["ab", "c"], ("bcd",), "a", False),  # "bc" held back, then flushed below
])
def test_stop_strings_never_leak(pieces: list[str], stops: tuple[str, ...], sent: str, hit: bool) -> None:
    matcher = StopMatcher(stops)
    out = ""
    reached = False
    for p in pieces:
        text, reached = matcher.feed(p)
        out += text
        if reached:
            break
    assert out == sent
    assert reached is hit
    if not hit:
        assert out + matcher.flush() == "".join(pieces)


# --- the sampling controls, against llama.cpp's own samplers ---------------------------------------------------

GOLDEN = json.loads((Path(__file__).parent / "data" / "sampling_golden.json").read_text())
CONTROLS = ("temperature", "top_k", "top_p", "min_p", "repeat_penalty", "repeat_last_n", "presence_penalty",
            "frequency_penalty")


def _params(case: dict) -> SamplingParams:
    bias = tuple((int(t), float(b)) for t, b in case.get("logit_bias", ()))
    return SamplingParams(**{"temperature": 1.0, **{k: case[k] for k in CONTROLS if k in case}}, logit_bias=bias)


def _distribution(logits: np.ndarray, params: SamplingParams, history: list[int]) -> dict[int, float]:
    ids, z = candidates(shape_logits(logits, params, history), params)
    temperature = params.temperature
    p = np.exp((z - z.max()) / temperature)
    return dict(zip(ids.tolist(), (p / p.sum()).tolist(), strict=True))


@pytest.mark.parametrize("case", GOLDEN["cases"], ids=[c["name"] for c in GOLDEN["cases"]])
def test_each_control_leaves_what_llama_cpp_leaves(case: dict) -> None:
    """tests/tinygrad_backend/data/make_sampling_golden.py ran llama.cpp's sampler chain on these logits."""
    logits = np.array(GOLDEN["logits"], dtype=np.float32)
    ours = _distribution(logits, _params(case), GOLDEN["history"])
    theirs = dict(zip(case["kept"], case["probs"], strict=True))
    theirs = {t: p for t, p in theirs.items() if p > 1e-12}
    ours = {t: p for t, p in ours.items() if p > 1e-12}
    assert sorted(ours) == sorted(theirs)
    assert np.allclose([ours[t] for t in sorted(ours)], [theirs[t] for t in sorted(ours)], atol=1e-5)


def test_draws_follow_the_distribution() -> None:
    logits = np.array(GOLDEN["logits"], dtype=np.float32)
    params = SamplingParams(temperature=0.9, top_k=20, top_p=0.9, min_p=0.02, repeat_penalty=1.2)
    want = _distribution(logits, params, GOLDEN["history"])
    rng = np.random.default_rng(3)
    draws = np.bincount([pick_token(logits, params, rng, GOLDEN["history"]) for _ in range(4000)], minlength=64) / 4000
    assert set(np.flatnonzero(draws)) <= set(want)
    assert max(abs(draws[t] - p) for t, p in want.items()) < 0.03


def test_greedy_sees_penalties_bias_and_mask() -> None:
    logits = np.array([0.0, 5.0, 4.9, 1.0])
    rng = np.random.default_rng(0)
    assert pick_token(logits, SamplingParams(temperature=0), rng) == 1
    assert pick_token(logits, SamplingParams(temperature=0, repeat_penalty=1.1), rng, history=[1]) == 2
    assert pick_token(logits, SamplingParams(temperature=0, logit_bias=((3, 10.0),)), rng) == 3
    assert pick_token(logits, SamplingParams(temperature=0), rng, allowed=np.array([True, False, False, True])) == 3
    picks = {pick_token(logits, SamplingParams(temperature=2.0), rng, allowed=np.array([True, False, False])) for _ in range(50)}
    assert picks == {0}  # a mask shorter than the logits refuses the tokens past its end
    with pytest.raises(ValueError):
        pick_token(logits, SamplingParams(temperature=0), rng, allowed=np.zeros(4, dtype=bool))


def test_shaping_copies_only_when_it_must() -> None:
    logits = np.arange(8, dtype=np.float32)
    assert shape_logits(logits, SamplingParams(), [1, 2]) is logits
    shaped = shape_logits(logits, SamplingParams(frequency_penalty=1.0), [7, 7, 7])
    assert shaped[7] == 4.0 and logits[7] == 7.0
    assert shape_logits(logits, SamplingParams(repeat_penalty=2.0, repeat_last_n=0), [7]) is logits


def test_top_k_over_a_whole_vocabulary_is_the_k_largest() -> None:
    logits = np.random.default_rng(1).normal(0, 3, 49152).astype(np.float32)
    ids, _ = candidates(logits, SamplingParams(top_k=40))
    assert ids.tolist() == np.argsort(-logits, kind="stable")[:40].tolist()


def test_logprobs_are_log_softmax_of_the_raw_logits() -> None:
    logits = np.array(GOLDEN["logits"], dtype=np.float32)
    full = logits.astype(np.float64) - np.log(np.exp(logits.astype(np.float64)).sum())
    chosen, top = token_logprobs(logits, 5, 3)
    assert chosen == pytest.approx(full[5])
    assert [t for t, _ in top] == np.argsort(-full)[:3].tolist()
    assert [lp for _, lp in top] == pytest.approx(sorted(full, reverse=True)[:3])
