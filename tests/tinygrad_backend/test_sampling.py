from __future__ import annotations

import numpy as np
import pytest

from tinygrad_backend.sampling import SamplingParams, StopMatcher, nucleus, pick_token


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
