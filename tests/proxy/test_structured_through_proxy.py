"""Structured output, tool calls and llama.cpp's sampling controls reach the real tinygrad backend through the
proxy (its provider forwards them) and come back in OpenAI's shapes, streamed and not."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import jsonschema
import openai
import pytest

from tests.conftest import write_config

pytestmark = pytest.mark.model

SCHEMA = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                           "sunny": {"type": "boolean"}},
          "required": ["city", "sunny"], "additionalProperties": False}
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                            "parameters": SCHEMA}}
ASK = [{"role": "user", "content": "Is it sunny in Paris? Answer in JSON."}]


@pytest.fixture(scope="module")
def client(real_proxy: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=real_proxy + "/v1", api_key="unused", max_retries=0, timeout=300)


def test_json_schema_answers_validate(client: openai.OpenAI) -> None:
    fmt = {"type": "json_schema", "json_schema": {"name": "weather", "schema": SCHEMA, "strict": True}}
    reply = client.chat.completions.create(model="quick", messages=ASK, response_format=fmt, max_tokens=40,  # type: ignore[arg-type]
                                           temperature=0)
    jsonschema.validate(json.loads(reply.choices[0].message.content or ""), SCHEMA)
    with client.chat.completions.create(model="quick", messages=ASK, response_format=fmt, max_tokens=40,  # type: ignore[call-overload]
                                        temperature=0.7, seed=3, stream=True) as stream:
        text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    jsonschema.validate(json.loads(text), SCHEMA)


def test_required_tool_call_comes_back_as_tool_calls(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(model="quick", messages=ASK, tools=[WEATHER], tool_choice="required",  # type: ignore[list-item]
                                           max_tokens=40, temperature=0)
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.tool_calls
    call = choice.message.tool_calls[0]
    assert call.function.name == "get_weather"  # type: ignore[union-attr]
    jsonschema.validate(json.loads(call.function.arguments), SCHEMA)  # type: ignore[union-attr]
    with client.chat.completions.create(model="quick", messages=ASK, tools=[WEATHER], tool_choice="required",  # type: ignore[call-overload]
                                        max_tokens=40, temperature=0, stream=True) as stream:
        chunks = list(stream)
    calls = [tc for c in chunks if c.choices for tc in (c.choices[0].delta.tool_calls or [])]
    assert calls and calls[0].function.name == "get_weather"
    jsonschema.validate(json.loads("".join(tc.function.arguments or "" for tc in calls)), SCHEMA)
    assert any(c.choices and c.choices[0].finish_reason == "tool_calls" for c in chunks)


def test_llama_cpp_sampling_controls_pass_and_are_checked(client: openai.OpenAI, real_proxy: str) -> None:
    body = {"model": "quick", "messages": ASK, "max_tokens": 3, "temperature": 0.9, "seed": 1}
    one = client.chat.completions.create(**body, extra_body={"top_k": 1})  # type: ignore[arg-type]
    greedy = client.chat.completions.create(**{**body, "temperature": 0})  # type: ignore[arg-type]
    assert one.choices[0].message.content == greedy.choices[0].message.content  # top_k 1 is greedy
    r = httpx.post(real_proxy + "/v1/chat/completions", json={**body, "min_p": 1.5})
    assert r.status_code == 400 and r.json()["error"]["param"] == "min_p"


def test_a_bad_schema_is_a_400_not_a_fallback(tmp_path: Path, bundled_backend: str, start_proxy) -> None:  # type: ignore[no-untyped-def]
    proxy = start_proxy(write_config(tmp_path / "c.yaml", [("quick", "tinygrad/smollm2", bundled_backend)]))
    fmt = {"type": "json_schema", "json_schema": {"name": "bad", "schema": {"type": "object", "minProperties": "two"}}}
    r = httpx.post(proxy.url + "/v1/chat/completions", json={"model": "quick", "messages": ASK, "response_format": fmt},
                   timeout=60)
    assert r.status_code == 400, r.text
