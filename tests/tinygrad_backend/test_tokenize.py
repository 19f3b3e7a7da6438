"""POST /v1/chat/tokenize: a chat body's prompt tokens, counted by the code path /v1/chat/completions renders with.

The counts are checked against real completions of the same bodies on the session's real backend (the bundled
SmolLM2, conftest.bundled_backend; one token each: the CPU is slow). Its access rules are checked on the real app
with a model that never finishes loading (loading_backend): the tokenizer needs no model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.tinygrad_backend.loading_backend import loading_backend

QUESTION = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
CALLED = [  # a tool round as an agent sends it back: the call the model made, then its result
    {"role": "user", "content": "What is the weather in Paris?"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": "Sunny, 21 C"},
]


def tokenize(url: str, body: dict[str, Any], **kwargs: Any) -> httpx.Response:
    return httpx.post(url + "/v1/chat/tokenize", json=body, timeout=60, **kwargs)


@pytest.fixture(scope="module")
def client(bundled_backend: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=bundled_backend + "/v1", api_key="unused", max_retries=0)


@pytest.mark.parametrize("extra", [
    {"messages": QUESTION},
    {"messages": [{"role": "system", "content": "Be brief."}, *QUESTION], "tools": [WEATHER]},
    {"messages": QUESTION, "tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "get_weather"}}},
    {"messages": CALLED, "tools": [WEATHER]},
], ids=["plain", "system-and-tools", "named-tool", "tool-round"])
def test_the_count_is_the_completions_prompt_tokens(bundled_backend: str, client: openai.OpenAI,
                                                     extra: dict[str, Any]) -> None:
    body = {"model": "smollm2", **extra}
    r = tokenize(bundled_backend, body)
    assert r.status_code == 200, r.text
    counted = r.json()
    served = client.chat.completions.create(**body, max_tokens=1, temperature=0)  # type: ignore[call-overload]
    assert served.usage is not None and counted["prompt_tokens"] == served.usage.prompt_tokens
    assert counted == {"object": "chat.tokenize", "model": "smollm2", "prompt_tokens": served.usage.prompt_tokens,
                       "context_length": 512}


def test_tools_count_as_rendered(bundled_backend: str) -> None:
    plain = tokenize(bundled_backend, {"model": "smollm2", "messages": QUESTION}).json()["prompt_tokens"]
    assert plain == 42  # llama.cpp counts 42 for this prompt too (test_server.py)
    offered = tokenize(bundled_backend, {"messages": QUESTION, "tools": [WEATHER]}).json()["prompt_tokens"]
    assert offered > plain + 50  # the tools are described in the system message
    # tool_choice "none" leaves the tools out of the prompt, as the completion does
    none = {"messages": QUESTION, "tools": [WEATHER], "tool_choice": "none"}
    assert tokenize(bundled_backend, none).json()["prompt_tokens"] == plain


def test_a_prompt_longer_than_the_context_is_counted(bundled_backend: str) -> None:
    r = tokenize(bundled_backend, {"model": "smollm2", "messages": [{"role": "user", "content": "word " * 600}]})
    assert r.status_code == 200 and r.json()["prompt_tokens"] > r.json()["context_length"] == 512


@pytest.mark.parametrize(("body", "status", "param"), [
    ({"model": "gpt-9", "messages": QUESTION}, 404, "model"),
    ({"messages": QUESTION, "tool_choice": "required"}, 400, "tool_choice"),
    ({"messages": QUESTION, "tools": [{"type": "function", "function": {"name": "bad name"}}]}, 400, "tools"),
    ({"messages": QUESTION, "tools": [WEATHER], "response_format": {"type": "json_object"}}, 400, "response_format"),
    ({"messages": QUESTION, "logit_bias": {"999999": 1}}, 400, "logit_bias"),
])
def test_what_the_completion_refuses_is_refused_alike(bundled_backend: str, body: dict[str, Any], status: int,
                                                      param: str) -> None:
    counted = tokenize(bundled_backend, body)
    served = httpx.post(bundled_backend + "/v1/chat/completions", json={**body, "max_tokens": 1}, timeout=60)
    assert counted.status_code == served.status_code == status
    assert counted.json() == served.json() and counted.json()["error"]["param"] == param


def test_the_api_key_and_the_body_limit_apply_and_it_counts_while_loading(tmp_path: Path) -> None:
    key = "sk-backend-test"
    with loading_backend(tmp_path, api_key=key, max_body_bytes=4096) as url:
        body = {"model": "smollm2", "messages": [{"role": "user", "content": "hi"}]}
        r = tokenize(url, body)
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
        auth = {"Authorization": f"Bearer {key}"}
        assert httpx.get(url + "/health").json()["status"] == "loading"
        r = tokenize(url, body, headers=auth)
        assert r.status_code == 200 and r.json()["prompt_tokens"] > 0 and r.json()["context_length"] == 64
        r = tokenize(url, {**body, "messages": [{"role": "user", "content": "x" * 5000}]}, headers=auth)
        assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
