"""Hostile request bodies for the backend's and the proxy's APIs, generated from a seed (the same seed gives
the same bodies, so a failure can be replayed).

Each body starts as a valid request of one API and is then broken in one to three ways: a field of the
wrong type, a number out of range or not finite, a huge or odd string, deep nesting, an unknown field,
a missing field, bytes that are not JSON or not UTF-8. Every body is a client mistake or a valid request
asking for at most 2 tokens; none may get a 5xx.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

ODD_NUMBERS: list[Any] = [-1, 0, 1, 2, 3, -(2**63), 2**63, 2**64 + 1, -(2**70), 0.5, -0.0, 5e-324, 1e-3, 1.5, 2.0000001,
                          1e308, -1e308, float("inf"), float("-inf"), float("nan"), True, False, None]
ODD_STRINGS = ["", "x", "\u0000", "\ud800", "😀" * 50, "a" * 5000, "<|im_end|>", "{{ 7*7 }}", "{% for x in range(9) %}",
               "\n" * 100, "null", "' OR 1=1 --"]
SAMPLING = ("temperature", "top_p", "seed", "max_tokens", "max_completion_tokens", "n", "stop", "stream",
            "stream_options", "logprobs", "top_logprobs", "logit_bias", "presence_penalty", "frequency_penalty",
            "tools", "tool_choice", "response_format", "user", "model")
OLLAMA_OPTIONS = ("temperature", "top_p", "seed", "num_predict", "stop", "num_ctx", "top_k", "repeat_penalty")


@dataclass(frozen=True)
class Hostile:
    path: str
    body: bytes  # sent as is, with `content_type`
    content_type: str = "application/json"


def _odd(rng: random.Random, depth: int = 0) -> Any:
    kind = rng.randrange(7 if depth < 3 else 3)
    if kind == 0:
        return rng.choice(ODD_NUMBERS)
    if kind == 1:
        return rng.choice(ODD_STRINGS)
    if kind == 2:
        return rng.randint(-(2**66), 2**66)
    if kind == 3:
        return [_odd(rng, depth + 1) for _ in range(rng.randrange(4))]
    if kind == 4:
        return {rng.choice(["type", "role", "content", "text", "x"]): _odd(rng, depth + 1) for _ in range(rng.randrange(3))}
    if kind == 5:
        nested: Any = "deep"
        for _ in range(rng.choice([10, 200, 5000])):
            nested = [nested]
        return nested
    return rng.random() * rng.choice([1, 10, 1e6])


def _message(rng: random.Random) -> dict[str, Any]:
    return {"role": rng.choice(["user", "system", "assistant"]), "content": rng.choice(["hi", "What is 2+2?", "Say yes."])}


def _valid(rng: random.Random, path: str) -> dict[str, Any]:
    if path == "/v1/chat/completions":
        return {"model": "MODEL", "messages": [_message(rng) for _ in range(rng.randint(1, 3))], "max_tokens": 2}
    if path == "/v1/completions":
        return {"model": "MODEL", "prompt": "Once upon a time", "max_tokens": 2}
    if path == "/api/chat":
        return {"model": "MODEL", "messages": [_message(rng)], "stream": rng.random() < 0.5, "options": {"num_predict": 2}}
    return {"model": "MODEL", "prompt": "Once upon a time", "stream": False, "options": {"num_predict": 2}}


def _break(rng: random.Random, body: dict[str, Any], path: str) -> None:
    how = rng.randrange(6)
    if how == 0:  # a sampling parameter set to something odd
        if path.startswith("/api/") and isinstance(body.get("options"), dict):
            body["options"][rng.choice(OLLAMA_OPTIONS)] = _odd(rng)
        else:
            body[rng.choice(SAMPLING)] = _odd(rng)
    elif how == 1:  # a required field odd or gone
        keys = [k for k in body if k != "model"]
        if not keys:
            return
        key = rng.choice(keys)
        if rng.random() < 0.3:
            del body[key]
        else:
            body[key] = _odd(rng)
    elif how == 2 and isinstance(body.get("messages"), list) and body["messages"] \
            and isinstance(body["messages"][0], dict):  # one message broken
        body["messages"][0][rng.choice(["role", "content", "tool_calls", "name", "tool_call_id"])] = _odd(rng)
    elif how == 3:
        body[rng.choice(["api_base", "metadata", "x" * 40, "format", "raw", "keep_alive", "mock_response"])] = _odd(rng)
    elif how == 4 and path.startswith("/api/"):
        body["format"] = _odd(rng)
    else:
        body["model"] = _odd(rng) if rng.random() < 0.5 else rng.choice(ODD_STRINGS)


def _capped(body: dict[str, Any], path: str) -> None:
    """A body that stays valid must not ask for more than 2 tokens: the CPU is slow."""
    for key in ("max_tokens", "max_completion_tokens"):
        value = body.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value > 2:
            body[key] = 2
    if not path.startswith("/api/") and "max_completion_tokens" not in body:
        body.setdefault("max_tokens", 2)
    options = body.get("options")
    if path.startswith("/api/") and not isinstance(options, dict):
        options = body["options"] = {}
    if isinstance(options, dict):
        value = options.get("num_predict")
        if value is None or (isinstance(value, int) and not isinstance(value, bool) and (value > 2 or -2 <= value <= 0)):
            options["num_predict"] = 2


def hostile_bodies(count: int, model: str, seed: int = 0,
                   paths: tuple[str, ...] = ("/v1/chat/completions", "/v1/completions", "/api/chat", "/api/generate"),
                   ) -> Iterator[Hostile]:
    rng = random.Random(seed)
    for i in range(count):
        path = paths[i % len(paths)]
        if rng.random() < 0.05:  # not JSON at all, or not sent as JSON
            raw = rng.choice([b"{not json", b"\xff\xfe\x00", b"[]", b"null", b"", b'{"model": "' + b"x" * 100 + b'"'])
            yield Hostile(path, raw, rng.choice(["application/json", "text/plain"]))
            continue
        body = json.loads(json.dumps(_valid(rng, path)).replace("MODEL", model))
        for _ in range(rng.randint(1, 3)):
            _break(rng, body, path)
        _capped(body, path)
        try:
            raw = json.dumps(body).encode("utf-8", "surrogatepass")
        except (RecursionError, ValueError):
            raw = b'{"model": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
        yield Hostile(path, raw)
