"""`model="auto"`: the task alias chosen from the request itself, without asking any model.

What it reads: the last user message (its first 1,500 and last 500 characters) and the first 300 characters of
the system prompt. A unified diff in the message is a code review, whatever else it says. Otherwise a
multinomial logistic regression over word, word-prefix, CJK-character and shape features (auto_router.json,
trained by bench/train_router.py on bench/routing/train.jsonl) scores each alias it knows, and the best of
those the request may use wins. Standard library only: the decision is a few hundred dictionary lookups.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Collection, Iterable
from functools import cache
from pathlib import Path
from typing import Any

AUTO = "auto"
MODEL_PATH = Path(__file__).with_name("auto_router.json")
HEAD, TAIL, SYSTEM_CHARS = 1500, 500, 300
BIGRAMS_AT_START, BIGRAMS_AT_END = 30, 10

_TOKEN = re.compile(r"\w+|[^\w\s]{1,3}")
_CJK = re.compile(r"[\u3040-\u30ff\u3400-\u9fff\uac00-\ud7af]+")
_DIFF = re.compile(r"^(?:diff --git |--- \S.*\n\+\+\+ |@@ -\d+(?:,\d+)? \+\d+(?:,\d+)? @@|Index: \S)", re.M)
_SCRIPTS = (("cjk", re.compile(r"[\u3040-\u30ff\u3400-\u9fff\uac00-\ud7af]")), ("cyrillic", re.compile(r"[\u0400-\u04ff]")),
            ("rtl", re.compile(r"[\u0590-\u06ff]")), ("indic", re.compile(r"[\u0900-\u0dff]")),
            ("thai", re.compile(r"[\u0e00-\u0e7f]")), ("greek", re.compile(r"[\u0370-\u03ff]")))


def text_of(content: Any) -> str:
    """A message's content as text: a string, or the text parts of a list of content parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(p["text"] for p in content if isinstance(p, dict) and isinstance(p.get("text"), str))
    return ""


def split_request(request: str | list[dict[str, Any]]) -> tuple[str, str]:
    """(the last user message, the system prompt) of chat messages; a text prompt is its own user message."""
    if isinstance(request, str):
        return request, ""
    user = next((m for m in reversed(request) if m.get("role") == "user"), request[-1] if request else {})
    system = next((m for m in request if m.get("role") in ("system", "developer")), {})
    return text_of(user.get("content")), text_of(system.get("content"))


def clip(text: str) -> str:
    """The part of a message the decision reads: its head and tail (a long paste says what it is in both)."""
    return text if len(text) <= HEAD + TAIL else text[:HEAD] + "\n" + text[-TAIL:]


def is_diff(text: str) -> bool:
    return _DIFF.search(text) is not None


def features(text: str, system: str = "") -> set[str]:
    """What the classifier sees of a request. Training (bench/train_router.py) calls this same function."""
    text = clip(text)
    low = text.lower()
    tokens = _TOKEN.findall(low)
    out = {"w:" + t for t in tokens}
    out.update("p:" + t[:5] for t in tokens if len(t) > 5 and t.isalpha())
    edge = tokens[:BIGRAMS_AT_START] + ["|"] + tokens[-BIGRAMS_AT_END:] if len(tokens) > BIGRAMS_AT_START else tokens
    out.update(f"b:{a} {b}" for a, b in zip(edge, edge[1:], strict=False))
    if tokens:
        out.add("first:" + tokens[0])
    for run in _CJK.findall(text[:400]):
        out.update("c:" + run[i:i + 2] for i in range(min(len(run) - 1, 40)))
    head = text[:400]
    out.update("script:" + name for name, pattern in _SCRIPTS if pattern.search(head))
    lines = text.count("\n") + 1
    out.add(f"len:{min(int(math.log2(len(text) + 1)), 12)}")
    out.add(f"lines:{min(lines, 8) if lines < 8 else 'many'}")
    if "```" in text:
        out.add("has:fence")
    if is_diff(text):
        out.add("has:diff")
    if sum(1 for line in text.split("\n", 60)[:60] if line[:1] in "+-" and line[:3] not in ("---", "+++")) >= 2:
        out.add("has:plusminus")
    if system:
        out.update("s:" + t for t in _TOKEN.findall(system[:SYSTEM_CHARS].lower()))
    return out


class Model:
    """Weights per feature for each label: a request's score for a label is its bias plus the sum of the request's
    features' weights, scaled by 1/sqrt(the number of features), as in training."""

    def __init__(self, raw: dict[str, Any]) -> None:
        self.labels: tuple[str, ...] = tuple(raw["labels"])
        self.bias: list[float] = raw["bias"]
        self.weights: dict[str, list[float]] = raw["weights"]

    def scores(self, text: str, system: str = "") -> dict[str, float]:
        found = features(text, system)
        rows = [row for f in found if (row := self.weights.get(f)) is not None]
        scale = 1 / math.sqrt(len(found)) if found else 0.0
        sums = [sum(col) for col in zip(*rows, strict=True)] if rows else [0.0] * len(self.labels)
        return {label: b + s * scale for label, b, s in zip(self.labels, self.bias, sums, strict=True)}


@cache
def model() -> Model:
    """The shipped model, read once per process."""
    return Model(json.loads(MODEL_PATH.read_text(encoding="utf-8")))


def labels() -> tuple[str, ...]:
    """The aliases the shipped model can choose."""
    return model().labels


class AutoRouter:
    """Chooses among `aliases` (config's delegate.auto.aliases); with none, `auto` is off."""

    def __init__(self, aliases: Iterable[str]) -> None:
        self.aliases = list(aliases)
        self.model = model() if self.aliases else None

    def choose(self, request: str | list[dict[str, Any]], allowed: Collection[str] | None = None) -> str | None:
        """The alias for a request (chat messages or a text prompt), among `aliases` and `allowed` (an issued key's
        aliases; None: all); None when none of them is left."""
        candidates = [a for a in self.aliases if allowed is None or a in allowed]
        if not candidates or self.model is None:
            return None
        text, system = split_request(request)
        text = clip(text)
        if "review" in candidates and is_diff(text):
            return "review"
        scores = self.model.scores(text, system)
        return max(candidates, key=lambda a: scores.get(a, -math.inf))
