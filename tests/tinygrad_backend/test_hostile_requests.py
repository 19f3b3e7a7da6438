"""Hostile requests against the real backend with the bundled model: each gets a 4xx in its API's shape or
an answer, never a 5xx, and the next plain request still answers.

The fuzz draws bodies over the whole parameter space of both APIs (OpenAI's and Ollama's, sampling options
included) with few tokens each, bounded to fit CI.
"""

from __future__ import annotations

import concurrent.futures
import json
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

QUESTION = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]


def plain_answer(url: str) -> str:
    r = httpx.post(url + "/v1/chat/completions", json={"messages": QUESTION, "max_tokens": 3, "temperature": 0},
                   timeout=60)
    assert r.status_code == 200, r.text
    return str(r.json()["choices"][0]["message"]["content"])


@pytest.mark.model
@pytest.mark.parametrize("seed", [-1, 2**63, -(2**70)])
def test_out_of_range_seed_is_400_and_the_engine_lives(bundled_backend: str, seed: int) -> None:
    r = httpx.post(bundled_backend + "/v1/chat/completions",
                   json={"messages": QUESTION, "max_tokens": 2, "seed": seed}, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["param"] == "seed"
    r = httpx.post(bundled_backend + "/api/chat", json={"model": "smollm2", "messages": QUESTION, "stream": False,
                                                        "options": {"seed": seed, "num_predict": 2}}, timeout=60)
    assert r.status_code == 400 and "seed" in r.json()["error"]
    assert plain_answer(bundled_backend)
    assert httpx.get(bundled_backend + "/health").json()["status"] == "ready"


@pytest.mark.model
def test_a_denormal_temperature_answers_as_greedy_next_to_other_requests(bundled_backend: str) -> None:
    def ask(temperature: float) -> httpx.Response:
        return httpx.post(bundled_backend + "/v1/chat/completions",
                          json={"messages": QUESTION, "max_tokens": 4, "temperature": temperature}, timeout=120)

    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        tiny, greedy, other = pool.map(ask, [5e-324, 0.0, 0.7])
    assert tiny.status_code == greedy.status_code == other.status_code == 200, (tiny.text, other.text)
    assert tiny.json()["choices"][0]["message"]["content"] == greedy.json()["choices"][0]["message"]["content"]


@pytest.mark.model
@pytest.mark.parametrize(("path", "body", "needle"), [
    ("/v1/chat/completions", {"messages": QUESTION, "top_p": 0}, "top_p"),
    ("/v1/chat/completions", {"messages": QUESTION, "stop": ["x"] * 17}, "stop"),
    ("/v1/chat/completions", {"messages": QUESTION, "stop": "x" * 1001}, "stop"),
    ("/api/chat", {"model": "smollm2", "messages": QUESTION, "options": {"temperature": 3}}, "temperature"),
    ("/api/generate", {"model": "smollm2", "prompt": "x", "options": {"num_predict": -3}}, "num_predict"),
    ("/api/generate", {"model": "smollm2", "prompt": "x", "options": {"top_p": 1.5}}, "top_p"),
])
def test_sampling_options_are_range_checked(bundled_backend: str, path: str, body: dict[str, Any], needle: str) -> None:
    r = httpx.post(bundled_backend + path, json=body, timeout=60)
    assert r.status_code == 400 and needle in r.text


@pytest.mark.model
@pytest.mark.parametrize("path", ["/v1/chat/completions", "/api/chat"])
@pytest.mark.parametrize(("raw", "status"), [
    (b'{"model": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", 400),  # nests past Python's recursion limit
    (b'{"model": "\\ud800", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1, "stream": false}', 404),
    (b'{"messages": [{"role": {"content": 1}, "content": "hi"}], "max_tokens": 1}', 400),  # an unhashable role
    (b'{"messages": [{"role": "user", "content": "a lone \\udfff half"}], "max_tokens": 1, "stream": false}', 200),
    (b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1, "temperature": NaN}', 400),
    (b"\xff\xfe not utf-8", 400),
    (b'{"messages": [{"role": "assistant", "content": "hi", "tool_calls": -17}], "max_tokens": 1, "stream": false}', 400),
])
def test_bodies_that_once_were_500s(bundled_backend: str, path: str, raw: bytes, status: int) -> None:
    if path == "/api/chat" and b'"model"' not in raw:
        raw = raw.replace(b"{", b'{"model": "smollm2", ', 1)
    r = httpx.post(bundled_backend + path, content=raw, headers={"content-type": "application/json"}, timeout=60)
    assert r.status_code == status, r.text


# --- the fuzz ------------------------------------------------------------------------------------------

anything = st.one_of(st.none(), st.booleans(), st.integers(-(2**65), 2**65), st.floats(allow_nan=True),
                     st.text(max_size=8), st.lists(st.integers(-3, 50_000), max_size=3),
                     st.dictionaries(st.text(max_size=4), st.integers(), max_size=2))
number = st.one_of(st.floats(-1e308, 1e308), st.sampled_from([0.0, 5e-324, 1e-3, 2.0, 2.0000001, -0.0]), anything)
small_count = st.one_of(st.integers(-3, 3), anything)
text_part = st.text(max_size=12)  # lone surrogates included: JSON escapes them
message = st.fixed_dictionaries({"role": st.one_of(st.sampled_from(["user", "system", "assistant", "tool", "wizard"]),
                                                 anything),
                                 "content": st.one_of(text_part, st.none(), st.integers(),
                                                      st.lists(st.fixed_dictionaries({"type": st.just("text"),
                                                                                      "text": text_part}), max_size=2))})
openai_params = st.fixed_dictionaries({}, optional={
    "temperature": number, "top_p": number, "seed": st.one_of(st.integers(-(2**64), 2**64), anything),
    "max_tokens": small_count, "max_completion_tokens": small_count,
    "stop": st.one_of(text_part, st.lists(text_part, max_size=3), anything),
    "n": small_count, "stream": st.one_of(st.booleans(), anything), "stream_options": anything, "tools": anything,
    "model": st.sampled_from(["smollm2", "tinygrad/smollm2", "other"]), "logit_bias": anything, "user": anything,
})
ollama_options = st.fixed_dictionaries({}, optional={
    "temperature": number, "top_p": number, "seed": st.one_of(st.integers(-(2**64), 2**64), anything),
    "num_predict": small_count, "stop": st.one_of(st.lists(text_part, max_size=3), anything), "num_ctx": anything,
})


def _bounded(body: dict[str, Any]) -> dict[str, Any]:
    """Whatever else is drawn, a generation that runs asks for at most 2 tokens: the CPU is slow."""
    for key in ("max_tokens", "max_completion_tokens"):
        if isinstance(body.get(key), int) and not isinstance(body[key], bool) and body[key] > 2:
            body[key] = 2
    body.setdefault("max_tokens", 2)
    return body


requests = st.one_of(
    st.builds(lambda ms, p: ("/v1/chat/completions", _bounded({"messages": ms, **p})), st.lists(message, max_size=3),
              openai_params),
    st.builds(lambda pr, p: ("/v1/completions", _bounded({"prompt": pr, **p})),
              st.one_of(text_part, st.lists(st.integers(-2, 60_000), max_size=4), anything), openai_params),
    st.builds(lambda ms, o, s, f: ("/api/chat", {"model": "smollm2", "messages": ms, "options": {**o, "num_predict": 2},
                                                 "stream": s, "format": f}),
              st.lists(message, max_size=3), ollama_options, st.booleans(), st.one_of(st.none(), anything)),
    st.builds(lambda pr, o, raw: ("/api/generate", {"model": "smollm2", "prompt": pr, "options": {**o, "num_predict": 2},
                                                    "raw": raw, "stream": False}),
              st.one_of(text_part, anything), ollama_options, st.one_of(st.booleans(), anything)),
)


@pytest.mark.model
@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(request=requests)
def test_fuzzed_requests_never_get_a_5xx(bundled_backend: str, request: tuple[str, dict[str, Any]]) -> None:
    path, body = request
    raw = json.dumps(body).encode()  # NaN and Infinity as Python writes them; surrogates escaped
    r = httpx.post(bundled_backend + path, content=raw, headers={"content-type": "application/json"}, timeout=120)
    assert r.status_code < 500, (path, body, r.status_code, r.text)
    if r.status_code >= 400:
        error = r.json()["error"]
        assert isinstance(error, str) if path.startswith("/api/") else set(error) >= {"message", "type"}
    elif r.headers.get("content-type", "").startswith(("text/event-stream", "application/x-ndjson")):
        assert "generation failed" not in r.text, r.text


@pytest.mark.model
def test_after_the_fuzz_a_plain_request_answers(bundled_backend: str) -> None:
    assert plain_answer(bundled_backend)
    assert httpx.get(bundled_backend + "/health").json()["status"] == "ready"
