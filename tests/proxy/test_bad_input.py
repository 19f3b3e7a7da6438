"""Bad input beyond the basic error cases (test_errors.py): odd text passes through intact, a prompt too
long for every model is a 400, model management is not exposed, and 1,000 generated requests get no 500."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import write_config


@pytest.fixture
def echo(tmp_path: Path, fake_backend, start_proxy):  # type: ignore[no-untyped-def]
    _, url = fake_backend("echo", mode="echo")
    _, small = fake_backend("small", context=10)
    _, tiny = fake_backend("tiny", context=5)
    config = write_config(tmp_path / "c.yaml", [("coding", "openai/echo", url), ("quick", "openai/small", small),
                                                ("tiny-model", "openai/tiny", tiny)],
                          aliases=["coding", "quick"], fallbacks={"quick": ["tiny-model"]},
                          context_fallbacks={"quick": ["tiny-model"]})
    return start_proxy(config)


@pytest.mark.parametrize(("text", "expected"), [
    ("nul \u0000 byte", "nul \u0000 byte"), ("emoji 😀👨‍👩‍👧", "emoji 😀👨‍👩‍👧"), ("pair \ud83d\ude00", "pair 😀"),
    # half a UTF-16 pair is not text any backend can take: it arrives as U+FFFD, and nothing fails
    ("lone \ud800 surrogate", "lone \ufffd surrogate"), ("\udfff", "\ufffd"), ("mixed \u0000😀\ud83d", "mixed \u0000😀\ufffd"),
])
@pytest.mark.parametrize("stream", [False, True])
def test_odd_text_round_trips(echo, text: str, expected: str, stream: bool) -> None:  # type: ignore[no-untyped-def]
    body = json.dumps({"model": "coding", "messages": [{"role": "user", "content": text}], "stream": stream})
    r = httpx.post(echo.url + "/v1/chat/completions", content=body.encode(), headers={"content-type": "application/json"})
    assert r.status_code == 200, r.text
    if stream:
        chunks = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: {")]
        answer = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    else:
        answer = json.loads(r.text)["choices"][0]["message"]["content"]
    assert answer == expected


def test_nan_temperature_is_400(echo) -> None:  # type: ignore[no-untyped-def]
    body = b'{"model": "coding", "messages": [{"role": "user", "content": "x"}], "temperature": NaN}'
    r = httpx.post(echo.url + "/v1/chat/completions", content=body, headers={"content-type": "application/json"})
    assert r.status_code == 400 and "NaN" in r.json()["error"]["message"]


def test_prompt_longer_than_every_context_is_400(echo) -> None:  # type: ignore[no-untyped-def]
    long = [{"role": "user", "content": "x" * 400}]
    r = httpx.post(echo.url + "/v1/chat/completions", json={"model": "quick", "messages": long})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["code"] == "context_length_exceeded"


@pytest.mark.parametrize("path", ["/api/pull", "/api/create", "/api/push", "/api/delete", "/api/copy", "/api/chat",
                                  "/v1/models/coding", "/model/new", "/model/delete", "/key/generate"])
def test_no_model_management_or_passthrough(echo, path: str) -> None:  # type: ignore[no-untyped-def]
    for method in ("POST", "DELETE", "GET"):
        r = httpx.request(method, echo.url + path, json={"model": "coding", "name": "llama3"})
        assert r.status_code in (404, 405), (method, path)
        assert "error" in r.json()


# --- property-based: whatever arrives, never a 500 -----------------------------------------------------

JSON_SCALARS = st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=False) | st.text(max_size=20)
JSON_VALUES = st.recursive(JSON_SCALARS, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                                                       max_size=4), max_leaves=12)
MESSAGE = st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant", "tool", "robot", ""]) | JSON_SCALARS,
                                 "content": st.text(max_size=50) | JSON_VALUES})
FIELDS = {
    "model": st.sampled_from(["coding", "quick", "nope", "", "../x"]) | JSON_SCALARS,
    "messages": st.lists(MESSAGE, max_size=3) | JSON_VALUES,
    "max_tokens": st.integers(-5, 10**9) | JSON_SCALARS,
    "temperature": st.floats(-1, 3, allow_nan=False) | JSON_SCALARS,
    "top_p": st.floats(-1, 2, allow_nan=False) | JSON_SCALARS,
    "stream": st.booleans() | JSON_SCALARS,
    "stream_options": st.just({"include_usage": True}) | JSON_VALUES,
    "n": st.integers(-1, 3) | JSON_SCALARS,
    "stop": st.lists(st.text(max_size=5), max_size=6) | JSON_VALUES,
    "seed": st.integers() | JSON_SCALARS,
    "tools": st.just([{"type": "function", "function": {"name": "f", "parameters": {}}}]) | JSON_VALUES,
    "tool_choice": st.sampled_from(["auto", "none"]) | JSON_VALUES,
    "user": st.text(max_size=10) | JSON_SCALARS,
    "api_base": st.text(max_size=10),
    "prompt": st.text(max_size=10) | JSON_VALUES,
}
RANDOM = st.dictionaries(st.sampled_from(sorted(FIELDS)), st.none(), max_size=8).flatmap(
    lambda keys: st.fixed_dictionaries({k: FIELDS[k] for k in keys}))
VALID = st.fixed_dictionaries(
    {"model": st.sampled_from(["coding", "quick"]),
     "messages": st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "system"]), "content": st.text(max_size=30)}),
                          min_size=1, max_size=3)},
    optional={"max_tokens": st.integers(1, 64), "temperature": st.floats(0, 2), "top_p": st.floats(0.01, 1),
              "stream": st.booleans(), "seed": st.integers(0, 2**31), "stop": st.lists(st.text(max_size=4), max_size=4),
              "user": st.text(max_size=8)})
# valid requests, valid ones with one field gone wrong, and anything at all
BODIES = VALID | st.tuples(VALID, RANDOM).map(lambda pair: {**pair[0], **pair[1]}) | RANDOM


def test_a_thousand_generated_requests_get_no_500(echo) -> None:  # type: ignore[no-untyped-def]
    seen: dict[int, int] = {}
    http = httpx.Client(timeout=30)

    @settings(max_examples=1000, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(body=BODIES, path=st.sampled_from(["/v1/chat/completions", "/v1/completions"]), raw=st.booleans())
    def one(body: dict, path: str, raw: bool) -> None:
        content = json.dumps(body).encode() if not raw else json.dumps(body)[:-1].encode()  # raw: cut short, invalid
        r = http.post(echo.url + path, content=content, headers={"content-type": "application/json"})
        seen[r.status_code] = seen.get(r.status_code, 0) + 1
        assert r.status_code < 500 or r.status_code in (502, 503, 504), (r.status_code, body, r.text)
        assert r.status_code != 500, r.text
        if r.status_code >= 400:
            assert set(r.json()["error"]) == {"message", "type", "param", "code"}

    one()
    assert sum(seen.values()) >= 1000
    assert seen.get(200, 0) > 0 and seen.get(400, 0) > 0  # the run reached both the answers and the refusals
