"""Choosing the next token from the logits, and cutting the text at a stop string.

The controls and their order are llama.cpp's sampler chain (common/sampling.cpp): the grammar's mask first,
then logit_bias, the repeat/presence/frequency penalties over the last `repeat_last_n` tokens (prompt
included, as llama.cpp's server and Ollama feed the prompt to their samplers), top_k, top_p and min_p on the
untempered distribution, and the temperature last. Greedy (temperature 0) still sees the mask, the bias and
the penalties, as llama.cpp's does. tests/tinygrad_backend/test_sampling.py checks each control against
llama.cpp's own samplers on fixed logits.

Everything here runs once per token on the engine thread beside a decode step, so nothing sorts the whole
vocabulary: top_k partitions it, and the nucleus is sorted among the few tokens above a threshold.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

# Below this a temperature is greedy: softmax(logits / T) puts all its mass on the top token long before
# T reaches it, and dividing by a denormal overflows to inf (inf - inf is NaN).
GREEDY_BELOW = 1e-3
SEED_LIMIT = 1 << 63  # seeds are in [0, 2^63), as llama.cpp's and Ollama's (a uint64 there, an int64 in JSON)
MAX_TOP_LOGPROBS = 20  # OpenAI's limit


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int | None = None  # None: until an end token or the context is full
    temperature: float = 0.8  # llama.cpp's and Ollama's default; 0 is greedy
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    top_k: int = 0  # 0 or less: off
    min_p: float = 0.0
    repeat_penalty: float = 1.0  # 1: off
    repeat_last_n: int = 64  # the penalties' window: 0 off, -1 the whole sequence
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, added to its logit)
    logprobs: bool = False  # report each chosen token's log-probability
    top_logprobs: int = 0  # and this many most likely alternatives

    @property
    def penalized(self) -> bool:
        return self.repeat_last_n != 0 and (
            self.repeat_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0)


def shape_logits(logits: np.ndarray, params: SamplingParams, history: Sequence[int] = (),
                 allowed: np.ndarray | None = None) -> np.ndarray:
    """The logits after the mask (`allowed`, one bool per token; tokens past its end are refused), the bias and
    the penalties; `logits` itself when none applies (no copy)."""
    if allowed is None and not params.logit_bias and not params.penalized:
        return logits
    x = logits.astype(np.float32, copy=True)
    if allowed is not None:
        n = min(len(allowed), len(x))
        np.putmask(x[:n], ~allowed[:n], -np.inf)
        x[n:] = -np.inf
    if params.logit_bias:
        ids = np.fromiter((i for i, _ in params.logit_bias), dtype=np.int64, count=len(params.logit_bias))
        bias = np.fromiter((b for _, b in params.logit_bias), dtype=np.float32, count=len(params.logit_bias))
        keep = ids < len(x)
        np.add.at(x, ids[keep], bias[keep])
    if params.penalized and history:
        window = history[-params.repeat_last_n:] if params.repeat_last_n > 0 else history
        ids, counts = np.unique(np.asarray(window, dtype=np.int64), return_counts=True)
        keep = ids < len(x)
        ids, counts = ids[keep], counts[keep]
        values = x[ids]
        # llama.cpp's llama_sampler_penalties_apply: a repeated token's logit moves toward "less likely" whatever
        # its sign, then the frequency (per occurrence) and presence (once) penalties are subtracted
        values = np.where(values <= 0, values * params.repeat_penalty, values / params.repeat_penalty)
        x[ids] = values - counts * params.frequency_penalty - params.presence_penalty
    return x


def candidates(x: np.ndarray, params: SamplingParams) -> tuple[np.ndarray, np.ndarray]:
    """The tokens top_k, top_p and min_p leave (in that order, as llama.cpp applies them), and their logits."""
    ids: np.ndarray | None = None
    if 0 < params.top_k < len(x):
        part = np.argpartition(x, len(x) - params.top_k)[len(x) - params.top_k:]
        ids = part[np.lexsort((part, -x[part]))]  # most likely first, ties by id
    if params.top_p < 1.0:
        if ids is None:
            probs = _softmax(x)
            ids = nucleus(probs, params.top_p)
        else:
            cumulative = np.cumsum(_softmax(x[ids]))  # top_p renormalizes over what top_k kept
            ids = ids[: int(np.searchsorted(cumulative, params.top_p)) + 1]
    if params.min_p > 0.0:
        floor = float(np.max(x if ids is None else x[ids])) + float(np.log(params.min_p))
        ids = np.flatnonzero(x >= floor) if ids is None else ids[x[ids] >= floor]
    if ids is None:
        return np.arange(len(x)), x
    return ids, x[ids]


def pick_token(logits: np.ndarray, params: SamplingParams, rng: np.random.Generator, history: Sequence[int] = (),
               allowed: np.ndarray | None = None) -> int:
    """Greedy at temperature 0 (or below GREEDY_BELOW), otherwise a draw from softmax(logits / T) over what
    top_k, top_p and min_p keep. `history` is the sequence so far (for the penalties), `allowed` a grammar's
    mask. Logits with no finite maximum (a model that produced NaN, or a mask that allows nothing) raise
    ValueError."""
    x = shape_logits(logits, params, history, allowed)
    top = int(np.argmax(x))
    if not np.isfinite(x[top]):
        raise ValueError("no token has a finite logit" if allowed is not None else "the model produced no finite logits")
    if params.temperature < GREEDY_BELOW:
        return top
    ids, z = candidates(x, params)
    probs = _softmax(z / params.temperature)
    return int(ids[rng.choice(len(ids), p=probs)])


def _softmax(z: np.ndarray) -> np.ndarray:
    z = z.astype(np.float64)
    probs = np.exp(z - z.max())  # shifted first: no overflow
    return probs / probs.sum()


def token_logprobs(logits: np.ndarray, token: int, top: int) -> tuple[float, list[tuple[int, float]]]:
    """The chosen token's log-probability under the model (its raw logits: before the mask, penalties and
    temperature, as vLLM reports by default), and the `top` most likely tokens with theirs, most likely first."""
    z = logits.astype(np.float64)
    peak = float(z.max())
    lse = peak + float(np.log(np.exp(z - peak).sum()))
    alternatives: list[tuple[int, float]] = []
    if top > 0:
        part = np.argpartition(z, len(z) - top)[len(z) - top:]
        ranked = part[np.lexsort((part, -z[part]))]
        alternatives = [(int(i), float(z[i]) - lse) for i in ranked]
    return float(z[token]) - lse, alternatives


def nucleus(probs: np.ndarray, top_p: float) -> np.ndarray:
    """The fewest most likely tokens whose probabilities reach top_p, most likely first (ties: lower id first).

    Sorted among the tokens above a threshold, lowered until their mass reaches top_p: every token above a
    threshold is a prefix of the whole order, and the nucleus is usually a few dozen tokens. Sorting the whole
    vocabulary (49k for SmolLM2) took ~3 ms a token, a fifth of a decode step."""
    for fraction in (1e-2, 1e-4, 1e-8, 0.0):
        above = np.flatnonzero(probs >= probs.max() * fraction)  # ascending ids: the stable sort breaks ties by id
        ranked = above[np.argsort(-probs[above], kind="stable")]
        n = int(np.searchsorted(np.cumsum(probs[ranked]), top_p))
        if n < len(ranked) or fraction == 0.0:
            return ranked[: n + 1]
    raise AssertionError("unreachable: the last threshold keeps every token")


class StopMatcher:
    """Holds back text that might be the start of a stop string, so a stop string never leaks out.

    feed() takes the next piece of generated text and returns what is safe to send and whether a stop
    string was reached (the text before it is sent, the stop string itself is not).
    """

    def __init__(self, stops: tuple[str, ...]) -> None:
        self._stops = tuple(s for s in stops if s)
        self._pending = ""
        self.hit = False

    def feed(self, text: str) -> tuple[str, bool]:
        if self.hit:
            return "", True
        if not self._stops:
            return text, False
        self._pending += text
        hits = [i for i in (self._pending.find(s) for s in self._stops) if i >= 0]
        if hits:
            out, self._pending = self._pending[: min(hits)], ""
            self.hit = True
            return out, True
        hold = 0
        for s in self._stops:
            for k in range(min(len(s) - 1, len(self._pending)), hold, -1):
                if self._pending.endswith(s[:k]):
                    hold = k
                    break
        cut = len(self._pending) - hold
        out, self._pending = self._pending[:cut], self._pending[cut:]
        return out, False

    def flush(self) -> str:
        out, self._pending = self._pending, ""
        return out
