"""Structured output, tool calls and the sampling controls, through the real `openai` and `ollama` clients
against the shared bundled backend (conftest.bundled_backend). Schemas keep their answers short (maxLength,
maxItems, enums) so that the grammar can close within a few dozen tokens on a slow CPU."""

from __future__ import annotations

import concurrent.futures
import json
from typing import Any

import httpx
import jsonschema
import ollama
import openai
import pytest

from tinygrad_backend.constraints import Grammars
from tinygrad_backend.tool_calls import ToolStream, parse_calls

pytestmark = pytest.mark.model

PERSON = {"role": "user", "content": "Describe a person named Ada as JSON."}
SCHEMAS: dict[str, dict[str, Any]] = {
    "flat, additionalProperties false": {
        "type": "object", "properties": {"name": {"type": "string", "maxLength": 12}, "age": {"type": "integer", "minimum": 0,
                                                                                              "maximum": 120}},
        "required": ["name", "age"], "additionalProperties": False},
    "nested object": {
        "type": "object", "properties": {
            "person": {"type": "object", "properties": {"name": {"type": "string", "maxLength": 10},
                                                        "address": {"type": "object", "properties": {
                                                            "city": {"type": "string", "maxLength": 10}},
                                                            "required": ["city"], "additionalProperties": False}},
                       "required": ["name", "address"], "additionalProperties": False}},
        "required": ["person"], "additionalProperties": False},
    "enum and boolean": {
        "type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]}, "bright": {"type": "boolean"}},
        "required": ["color", "bright"], "additionalProperties": False},
    "bounded array": {
        "type": "object", "properties": {"tags": {"type": "array", "items": {"type": "string", "maxLength": 8},
                                                  "minItems": 1, "maxItems": 3}},
        "required": ["tags"], "additionalProperties": False},
    "numbers": {
        "type": "object", "properties": {"height": {"type": "number", "minimum": 0, "maximum": 3},
                                         "count": {"type": "integer", "minimum": -5, "maximum": 5}},
        "required": ["height", "count"], "additionalProperties": False},
    "array of objects": {
        "type": "array", "items": {"type": "object", "properties": {"id": {"type": "integer", "minimum": 0, "maximum": 99},
                                                                    "done": {"type": "boolean"}},
                                   "required": ["id", "done"], "additionalProperties": False},
        "minItems": 1, "maxItems": 2},
}


@pytest.fixture(scope="module")
def client(bundled_backend: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=bundled_backend + "/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def ollama_client(bundled_backend: str) -> ollama.Client:
    return ollama.Client(host=bundled_backend)


def _format(schema: dict[str, Any]) -> dict[str, Any]:
    return {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema, "strict": True}}


def _valid(text: str, schema: dict[str, Any]) -> Any:
    value = json.loads(text)
    jsonschema.validate(value, schema)
    return value


# --- JSON schemas -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(SCHEMAS))
def test_chat_answers_validate_against_their_schema(client: openai.OpenAI, name: str) -> None:
    schema = SCHEMAS[name]
    r = client.chat.completions.create(model="smollm2", messages=[PERSON], temperature=0.7, seed=1, max_tokens=80,
                                       response_format=_format(schema))  # type: ignore[arg-type]
    assert r.choices[0].finish_reason == "stop"
    _valid(r.choices[0].message.content or "", schema)


def test_streamed_answer_validates(client: openai.OpenAI) -> None:
    schema = SCHEMAS["nested object"]
    chunks = list(client.chat.completions.create(model="smollm2", messages=[PERSON], temperature=0, max_tokens=80,
                                                 response_format=_format(schema), stream=True))  # type: ignore[arg-type]
    _valid("".join(c.choices[0].delta.content or "" for c in chunks if c.choices), schema)
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_json_object_and_legacy_completions(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(model="smollm2", messages=[PERSON], temperature=0, max_tokens=80,
                                       response_format={"type": "json_object"})
    if r.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(r.choices[0].message.content or ""), dict)
    schema = SCHEMAS["enum and boolean"]
    c = client.completions.create(model="smollm2", prompt="A JSON description of the sky:", max_tokens=40, temperature=0,
                                  extra_body={"response_format": _format(schema)})
    _valid(c.choices[0].text, schema)


def test_constrained_and_free_slots_decode_together(bundled_backend: str) -> None:
    """Schema requests share decode steps with free ones; each constrained answer follows its own schema."""
    names = ["flat, additionalProperties false", "enum and boolean", "numbers"]

    def constrained(name: str) -> str:
        c = openai.OpenAI(base_url=bundled_backend + "/v1", api_key="unused", max_retries=0)
        r = c.chat.completions.create(model="smollm2", messages=[PERSON], temperature=0.8, seed=7, max_tokens=60,
                                      response_format=_format(SCHEMAS[name]))  # type: ignore[arg-type]
        return r.choices[0].message.content or ""

    def free() -> str:
        c = openai.OpenAI(base_url=bundled_backend + "/v1", api_key="unused", max_retries=0)
        r = c.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": "Tell me a story."}],
                                      temperature=0, max_tokens=40)
        return r.choices[0].message.content or ""

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        free_answer = pool.submit(free)
        answers = list(pool.map(constrained, names))
    for name, text in zip(names, answers, strict=True):
        _valid(text, SCHEMAS[name])
    assert not free_answer.result().lstrip().startswith("{")


def test_ollama_format_schema_and_json(ollama_client: ollama.Client) -> None:
    schema = SCHEMAS["bounded array"]
    r = ollama_client.chat(model="smollm2", messages=[PERSON], format=schema, options={"temperature": 0, "num_predict": 60})
    _valid(r.message.content, schema)
    parts = list(ollama_client.generate(model="smollm2", prompt="Describe Ada as JSON.", format=SCHEMAS["numbers"],
                                        stream=True, options={"temperature": 0, "num_predict": 60}))
    _valid("".join(p.response for p in parts), SCHEMAS["numbers"])
    r = ollama_client.chat(model="smollm2", messages=[PERSON], format="json", options={"temperature": 0, "num_predict": 80})
    if r.done_reason == "stop":
        json.loads(r.message.content)


@pytest.mark.parametrize(("schema", "problem"), [
    ({"type": "strnig"}, "strnig"),
    ({"type": "string", "pattern": "("}, "unclosed group"),
    ({"type": "integer", "minimum": 5, "maximum": 1}, "minimum"),
    ({"$ref": "#/definitions/missing"}, "missing"),
    ({"not": {"type": "string"}}, "not"),
])
def test_bad_schemas_are_400_naming_the_problem(bundled_backend: str, schema: dict[str, Any], problem: str) -> None:
    r = httpx.post(bundled_backend + "/v1/chat/completions", json={
        "model": "smollm2", "messages": [PERSON], "max_tokens": 5, "response_format": _format(schema)})
    assert r.status_code == 400
    error = r.json()["error"]
    assert error["param"] == "response_format" and problem in error["message"]
    r = httpx.post(bundled_backend + "/api/chat", json={"model": "smollm2", "messages": [PERSON], "format": schema})
    assert r.status_code == 400 and problem in r.json()["error"]


@pytest.mark.parametrize("fmt", [{"type": "xml"}, {"type": "json_schema"}, {"type": "json_schema", "json_schema": {"schema": 3}}])
def test_malformed_response_format_is_400(bundled_backend: str, fmt: dict[str, Any]) -> None:
    r = httpx.post(bundled_backend + "/v1/chat/completions", json={"model": "smollm2", "messages": [PERSON],
                                                                    "response_format": fmt})
    assert r.status_code == 400 and r.json()["error"]["param"] == "response_format"


# --- tool calls -------------------------------------------------------------------------------------------------

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The current weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 16},
                                                    "unit": {"enum": ["celsius", "fahrenheit"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "parameters": {"type": "object", "properties": {"zone": {"type": "string", "maxLength": 12}},
                                       "required": ["zone"], "additionalProperties": False}}}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "get_time"}}])
def test_required_and_named_tool_choice_return_valid_calls(client: openai.OpenAI, choice: Any) -> None:
    r = client.chat.completions.create(model="smollm2", messages=ASK, tools=[WEATHER, TIME], tool_choice=choice,
                                       temperature=0, max_tokens=60)  # type: ignore[arg-type]
    message = r.choices[0].message
    assert r.choices[0].finish_reason == "tool_calls" and message.content is None
    assert message.tool_calls and len(message.tool_calls) == 1
    call = message.tool_calls[0]
    assert call.type == "function" and call.id.startswith("call_")
    tool = {"get_weather": WEATHER, "get_time": TIME}[call.function.name]  # type: ignore[union-attr]
    if isinstance(choice, dict):
        assert call.function.name == "get_time"  # type: ignore[union-attr]
    jsonschema.validate(json.loads(call.function.arguments), tool["function"]["parameters"])  # type: ignore[union-attr,index]


def test_tool_calls_stream_as_deltas_and_the_conversation_continues(client: openai.OpenAI) -> None:
    chunks = list(client.chat.completions.create(model="smollm2", messages=ASK, tools=[WEATHER], tool_choice="required",
                                                 temperature=0, max_tokens=60, stream=True))  # type: ignore[arg-type]
    assert not "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)  # no markup leaks as content
    deltas = [d for c in chunks if c.choices for d in (c.choices[0].delta.tool_calls or [])]
    assert len(deltas) == 1 and deltas[0].index == 0 and deltas[0].function and deltas[0].function.name == "get_weather"
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    args = json.loads(deltas[0].function.arguments or "")
    jsonschema.validate(args, WEATHER["function"]["parameters"])  # type: ignore[index]
    history = [*ASK, {"role": "assistant", "content": None, "tool_calls": [
                   {"id": deltas[0].id, "type": "function",
                    "function": {"name": "get_weather", "arguments": deltas[0].function.arguments}}]},
               {"role": "tool", "tool_call_id": deltas[0].id, "content": '{"temperature": 21, "sky": "sunny"}'}]
    r = client.chat.completions.create(model="smollm2", messages=history, tools=[WEATHER],  # type: ignore[arg-type]
                                       tool_choice="none", temperature=0, max_tokens=20)
    assert r.choices[0].message.content and not r.choices[0].message.tool_calls
    assert "<tool_call>" not in r.choices[0].message.content


def test_auto_answers_in_text_without_markup(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": "Say hello."}],
                                       tools=[WEATHER], temperature=0, max_tokens=16)  # type: ignore[arg-type]
    message = r.choices[0].message
    assert "<tool_call>" not in (message.content or "")
    if message.tool_calls:  # the model chose a call: then it is a valid one
        jsonschema.validate(json.loads(message.tool_calls[0].function.arguments), WEATHER["function"]["parameters"])  # type: ignore[union-attr,index]


def test_ollama_tool_calls(bundled_backend: str) -> None:
    body = {"model": "smollm2", "messages": ASK, "tools": [WEATHER], "stream": False,
            "options": {"temperature": 0, "num_predict": 16}}
    r = httpx.post(bundled_backend + "/api/chat", json=body, timeout=120)
    assert r.status_code == 200 and "<tool_call>" not in r.json()["message"]["content"]
    history = [*ASK, {"role": "assistant", "content": "", "tool_calls": [
                   {"function": {"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}}]},
               {"role": "tool", "content": "21 degrees and sunny"}]
    r2 = ollama.Client(host=bundled_backend).chat(model="smollm2", messages=history,
                                                  options={"temperature": 0, "num_predict": 12})
    assert r2.message.content


def test_bad_tools_are_400(bundled_backend: str) -> None:
    cases = [({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools"),
             ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
             ({"tools": [WEATHER], "tool_choice": "sometimes"}, "tool_choice"),
             ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "bogus"}}}],
               "tool_choice": "required"}, "tools"),
             ({"tools": [WEATHER], "response_format": {"type": "json_object"}}, "response_format")]
    for extra, param in cases:
        r = httpx.post(bundled_backend + "/v1/chat/completions", json={"model": "smollm2", "messages": ASK, **extra})
        assert r.status_code == 400 and r.json()["error"]["param"] == param, (extra, r.text)


# --- sampling controls over HTTP ------------------------------------------------------------------------------

COLOR = [{"role": "user", "content": "Name a color."}]


def test_top_k_1_is_greedy_at_any_temperature(client: openai.OpenAI, ollama_client: ollama.Client) -> None:
    greedy = client.chat.completions.create(model="smollm2", messages=COLOR, temperature=0, max_tokens=6)
    hot = client.chat.completions.create(model="smollm2", messages=COLOR, temperature=2, max_tokens=6, seed=5,
                                         extra_body={"top_k": 1})
    assert hot.choices[0].message.content == greedy.choices[0].message.content
    o = ollama_client.chat(model="smollm2", messages=COLOR, options={"temperature": 2, "top_k": 1, "num_predict": 6,
                                                                     "repeat_penalty": 1.0})
    assert o.message.content == greedy.choices[0].message.content


def test_penalties_change_the_answer(client: openai.OpenAI) -> None:
    ask = [{"role": "user", "content": "Say yes yes yes yes."}]
    plain = client.chat.completions.create(model="smollm2", messages=ask, temperature=0, max_tokens=8)  # type: ignore[arg-type]
    off = client.chat.completions.create(model="smollm2", messages=ask, temperature=0, max_tokens=8,  # type: ignore[arg-type]
                                         extra_body={"repeat_penalty": 1.0, "repeat_last_n": 0})
    assert off.choices[0].message.content == plain.choices[0].message.content  # the OpenAI routes' defaults: off
    for extra in ({"presence_penalty": 2.0, "frequency_penalty": 2.0}, {"extra_body": {"repeat_penalty": 1.8}}):
        penalized = client.chat.completions.create(model="smollm2", messages=ask, temperature=0, max_tokens=8,  # type: ignore[arg-type]
                                                   **extra)
        assert penalized.choices[0].message.content != plain.choices[0].message.content, extra


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    from tinygrad_backend.cli import resolve_model
    from tinygrad_backend.gguf_file import read_header
    from tinygrad_backend.tokenizer import GGUFTokenizer

    return GGUFTokenizer(read_header(resolve_model("smollm2")[1]).metadata)


def test_logit_bias_bans_and_forces_tokens(bundled_backend: str, tokenizer: Any) -> None:
    body = {"model": "smollm2", "prompt": "The capital of France is", "max_tokens": 1, "temperature": 0, "logprobs": 1}
    token = httpx.post(bundled_backend + "/v1/completions", json=body).json()["choices"][0]["logprobs"]["tokens"][0]
    (token_id,) = tokenizer.encode(token)
    banned = httpx.post(bundled_backend + "/v1/completions", json={**body, "logit_bias": {str(token_id): -100}}).json()
    assert banned["choices"][0]["logprobs"]["tokens"][0] != token
    forced = httpx.post(bundled_backend + "/v1/completions", json={**body, "logit_bias": {"4000": 100}}).json()
    assert forced["choices"][0]["logprobs"]["tokens"][0] == tokenizer.token_text(4000)
    bad = httpx.post(bundled_backend + "/v1/completions", json={**body, "logit_bias": {"999999": 1}})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "logit_bias"


def test_logprobs_in_openai_shapes(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(model="smollm2", messages=COLOR, temperature=0, max_tokens=4, logprobs=True,
                                       top_logprobs=3)
    content = r.choices[0].logprobs.content  # type: ignore[union-attr]
    assert content and len(content) == r.usage.completion_tokens  # type: ignore[union-attr]
    assert "".join(e.token for e in content) == r.choices[0].message.content
    for e in content:
        assert len(e.top_logprobs) == 3 and e.top_logprobs[0].logprob >= e.top_logprobs[-1].logprob
        assert e.top_logprobs[0].token == e.token and e.logprob <= 0  # greedy: the chosen one is the most likely
    chunks = list(client.chat.completions.create(model="smollm2", messages=COLOR, temperature=0, max_tokens=4,
                                                 logprobs=True, stream=True))
    streamed = [e.token for c in chunks if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content or []]
    assert streamed == [e.token for e in content]
    legacy = client.completions.create(model="smollm2", prompt="The sky is", max_tokens=3, temperature=0, logprobs=2)
    lp = legacy.choices[0].logprobs
    assert lp and lp.tokens and len(lp.tokens) == 3 and len(lp.top_logprobs or []) == 3 and lp.text_offset == [
        0, len(lp.tokens[0]), len(lp.tokens[0]) + len(lp.tokens[1])]


def test_ollama_num_ctx_above_the_context_is_refused(ollama_client: ollama.Client) -> None:
    with pytest.raises(ollama.ResponseError) as e:
        ollama_client.chat(model="smollm2", messages=COLOR, options={"num_ctx": 4096})
    assert e.value.status_code == 400 and "num_ctx" in str(e.value)
    ok = ollama_client.chat(model="smollm2", messages=COLOR, options={"num_ctx": 256, "num_predict": 2, "temperature": 0})
    assert ok.done


# --- without the model: the lazy grammar and the markup filter ------------------------------------------------


def test_a_lazy_grammar_waits_for_its_trigger(tokenizer: Any) -> None:
    from tinygrad_backend.tool_calls import read_tools

    tok = tokenizer
    tools = read_tools([WEATHER], "auto")
    assert tools is not None
    constraint = tools.constraint(Grammars(tok))
    assert constraint is not None
    prefix = tok.encode("Let me check. <tool_call>\n")
    for token in prefix:
        if constraint.active:  # the trigger is complete: what follows it is held to the grammar
            assert constraint.allowed()[token]  # type: ignore[index]
        else:
            assert constraint.allowed() is None
        constraint.accept(token)
    assert constraint.active
    allowed = constraint.allowed()
    assert allowed is not None and allowed[tok.encode('{"')[0]] and not allowed[tok.encode("Hello")[0]]
    for token in tok.encode('{"name":"get_weather","arguments":{"city":"Oslo","unit":"celsius"}}\n</tool_call>'):
        assert constraint.allowed()[token]  # type: ignore[index]
        constraint.accept(token)
    assert constraint.done


def test_markup_never_streams_and_parses_into_calls() -> None:
    stream = ToolStream()
    out = "".join(stream.feed(p) for p in ["Sure", ". <tool", "_call>\n{\"name\": \"f\", ", "\"arguments\": {\"a\": 1}}",
                                           "\n</tool_call>"])
    held, calls = stream.finish()
    assert out + held == "Sure. " and [(c.name, c.arguments) for c in calls] == [("f", {"a": 1})]
    plain = ToolStream()
    assert plain.feed("a <") == "a " and plain.feed("b") == "<b" and plain.finish() == ("", [])
    text, calls = parse_calls('<tool_call>\n{"name": "f", "arguments": {"x": "y"}}\n</tool_call>')
    assert text == "" and calls[0].openai()["function"] == {"name": "f", "arguments": '{"x": "y"}'}
    text, calls = parse_calls('Hi <tool_call>\n{"name": "f", "argu')  # cut short: dropped, never shown
    assert calls == [] and text == "Hi "
