"""Anthropic's Messages API through the real proxy: fake OpenAI-compatible backends for the local aliases, and
a fake Anthropic (tests/fake_anthropic.py) for what passes through, since the cloud cannot be reached here.

The real `anthropic` SDK is the client wherever it can be; raw httpx where the test needs the bytes.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

import anthropic
import httpx
import litellm
import pytest

from proxy.usage.store import UsageStore
from tests.conftest import write_config
from tests.fake_anthropic import USAGE, FakeAnthropic
from tests.servers import ServerThread, refused_port, wait_rows

HAIKU = "claude-haiku-4-5"
SONNET = "claude-sonnet-4-5"
CLAUDE_KEY = "sk-ant-test"
MASTER = "sk-master-test"



@pytest.fixture
def upstream():  # type: ignore[no-untyped-def]
    fake = FakeAnthropic(CLAUDE_KEY)
    with ServerThread(fake.app) as server:
        yield fake, server.url


def config(tmp_path: Path, local_url: str, upstream_url: str, anthropic: dict[str, Any] | None = None,
           context_url: str | None = None) -> Path:
    """`quick` (the haiku tier by default) on a fake backend; `dead` where nothing listens."""
    dead = f"http://127.0.0.1:{refused_port()}/v1"
    deployments = [("quick", "openai/local-model", local_url), ("dead", "openai/dead", dead)]
    if context_url:
        deployments.append(("small", "openai/small-model", context_url))
    return write_config(tmp_path / "c.yaml", deployments, aliases=[d[0] for d in deployments],
                        delegate={"anthropic": {"base_url": upstream_url, **(anthropic or {})}})


@pytest.fixture
def setup(tmp_path: Path, fake_backend, start_proxy, upstream):  # type: ignore[no-untyped-def]
    backend, url = fake_backend("local")
    fake, upstream_url = upstream
    proxy = start_proxy(config(tmp_path, url, upstream_url))
    return proxy, backend, fake


def client(proxy: Any, key: str = "sk-anything", **kwargs: Any) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=proxy.url, api_key=key, max_retries=0, **kwargs)


# --- served locally ------------------------------------------------------------------------------------

def test_haiku_tier_is_served_by_the_local_alias(setup) -> None:  # type: ignore[no-untyped-def]
    proxy, backend, fake = setup
    raw = client(proxy).messages.with_raw_response.create(
        model=HAIKU, max_tokens=64, messages=[{"role": "user", "content": "hi"}])
    message = raw.parse()
    assert message.id.startswith("msg_") and message.type == "message" and message.role == "assistant"
    assert [b.type for b in message.content] == ["text"] and message.content[0].text == "answer from local"  # type: ignore[union-attr]
    assert message.stop_reason == "end_turn"
    assert message.usage.input_tokens > 0 and message.usage.output_tokens == 3
    assert raw.headers["x-delegate-alias"] == "quick" and raw.headers["x-delegate-served-by"] == "openai/local-model"
    assert fake.bodies == []  # nothing went to Anthropic
    rows = wait_rows(1)
    assert [(r["alias"], r["endpoint"], r["model"], r["status"]) for r in rows] == [
        ("quick", "messages", "openai/local-model", "success")]
    assert rows[0]["prompt_tokens"] == message.usage.input_tokens


def test_an_alias_works_as_a_model(setup) -> None:  # type: ignore[no-untyped-def]
    proxy, _, _ = setup
    message = client(proxy).messages.create(model="quick", max_tokens=8, messages=[{"role": "user", "content": "hi"}])
    assert message.content[0].text == "answer from local"  # type: ignore[union-attr]


def test_stream_is_anthropics_event_sequence(setup) -> None:  # type: ignore[no-untyped-def]
    proxy, _, _ = setup
    with httpx.stream("POST", proxy.url + "/v1/messages", json={
            "model": HAIKU, "max_tokens": 64, "stream": True, "messages": [{"role": "user", "content": "hi"}]},
            headers={"x-api-key": "k", "anthropic-version": "2023-06-01"}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        text = r.read().decode()
    events = [block for block in text.strip().split("\n\n")]
    names = [e.split("\n")[0].removeprefix("event: ") for e in events]
    datas = [json.loads(e.split("\n")[1].removeprefix("data: ")) for e in events]
    assert names == ["message_start", "content_block_start", "ping", "content_block_delta", "content_block_delta",
                     "content_block_delta", "content_block_stop", "message_delta", "message_stop"]
    assert [d["type"] for d in datas] == names
    assert datas[0]["message"]["id"].startswith("msg_")
    assert "".join(d["delta"]["text"] for d in datas if d["type"] == "content_block_delta") == "answer from local"
    assert datas[7]["delta"]["stop_reason"] == "end_turn"
    assert datas[7]["usage"]["output_tokens"] == 3 and datas[7]["usage"]["input_tokens"] > 0


def test_sdk_stream_helper_gets_the_whole_message(setup) -> None:  # type: ignore[no-untyped-def]
    proxy, _, _ = setup
    with client(proxy).messages.stream(model=HAIKU, max_tokens=64, messages=[{"role": "user", "content": "hi"}]) as s:
        text = "".join(s.text_stream)
        final = s.get_final_message()
    assert text == "answer from local" and final.stop_reason == "end_turn" and final.usage.output_tokens == 3
    assert wait_rows(1)[0]["stream"]


def test_claude_code_shaped_request_is_served_locally(setup) -> None:  # type: ignore[no-untyped-def]
    """System blocks with cache_control, tools, metadata.user_id, thinking, an earlier tool round and Claude
    Code's beta header: served by the local alias, with what it cannot use dropped."""
    proxy, backend, fake = setup
    body = {
        "model": "claude-haiku-4-5-20251001", "max_tokens": 512, "stream": False,
        "system": [{"type": "text", "text": "You are Claude Code, Anthropic's official CLI for Claude."},
                   {"type": "text", "text": "Answer tersely.", "cache_control": {"type": "ephemeral"}}],
        "tools": [{"name": "Read", "description": "Read a file", "input_schema": {
            "type": "object", "properties": {"file_path": {"type": "string"}}, "required": ["file_path"]}}],
        "metadata": {"user_id": "user_abc_account__session_123"}, "stop_sequences": ["</done>"],
        "thinking": {"type": "enabled", "budget_tokens": 1024}, "cache_control": {"type": "ephemeral"},
        "messages": [
            {"role": "user", "content": [{"type": "text", "text": "What is in a.txt?",
                                          "cache_control": {"type": "ephemeral"}}]},
            {"role": "assistant", "content": [{"type": "thinking", "thinking": "read it", "signature": "sig"},
                                              {"type": "tool_use", "id": "toolu_01", "name": "Read",
                                               "input": {"file_path": "a.txt"}}]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_01", "content": "hello"}]},
        ],
    }
    r = httpx.post(proxy.url + "/v1/messages", json=body, headers={
        "x-api-key": "k", "anthropic-version": "2023-06-01",
        "anthropic-beta": "claude-code-20250219,interleaved-thinking-2025-05-14"})
    assert r.status_code == 200, r.text
    assert r.headers["x-delegate-alias"] == "quick" and r.json()["content"][0]["text"] == "answer from local"
    sent = backend.requests[-1]
    assert sent["messages"][0]["role"] == "system" and "official CLI" in json.dumps(sent["messages"][0])
    assert [m["role"] for m in sent["messages"][1:]] == ["user", "assistant", "tool"]
    assert sent["messages"][2]["tool_calls"][0]["function"]["name"] == "Read"
    assert sent["messages"][3] == {"role": "tool", "tool_call_id": "toolu_01", "content": "hello"}
    assert sent["tools"][0]["function"]["name"] == "Read"
    assert "cache_control" not in json.dumps(sent) and "thinking" not in json.dumps(sent)
    assert sent["stop"] == ["</done>"] and sent["max_tokens"] == 512
    assert fake.bodies == []


# --- errors in Anthropic's shape -------------------------------------------------------------------------

def _error(r: httpx.Response) -> tuple[int, str]:
    body = r.json()
    assert body["type"] == "error" and isinstance(body["error"]["message"], str) and body["error"]["message"]
    return r.status_code, body["error"]["type"]


def test_errors_have_anthropics_shape_status_and_type(setup) -> None:  # type: ignore[no-untyped-def]
    proxy, _, _ = setup
    url, hi = proxy.url + "/v1/messages", [{"role": "user", "content": "hi"}]
    assert _error(httpx.post(url, json={"model": HAIKU, "messages": hi})) == (400, "invalid_request_error")
    assert _error(httpx.post(url, json={"model": HAIKU, "max_tokens": 5, "messages": []})) == (
        400, "invalid_request_error")
    assert _error(httpx.post(url, json={"model": "gpt-4o", "max_tokens": 5, "messages": hi})) == (
        404, "not_found_error")
    assert _error(httpx.post(url, content=b"{not json", headers={"content-type": "application/json"})) == (
        400, "invalid_request_error")
    assert _error(httpx.post(url, json={"model": HAIKU, "max_tokens": 5,
                                        "messages": [{"role": "user", "content": "x" * (5 * 1024 * 1024)}]})) == (
        413, "request_too_large")
    # nothing local can answer and no Anthropic key to fall back with: overloaded, as Anthropic would say
    r = httpx.post(url, json={"model": "dead", "max_tokens": 5, "messages": hi})
    assert _error(r) == (529, "overloaded_error") and "retry-after" in r.headers
    with pytest.raises(anthropic.BadRequestError):
        client(proxy).messages.create(model=HAIKU, max_tokens=0, messages=hi)  # type: ignore[arg-type]


def test_keys_by_x_api_key_or_bearer_with_limits(tmp_path: Path, fake_backend, start_proxy, upstream) -> None:  # type: ignore[no-untyped-def]
    from proxy.usage.keys import KeyStore

    _, url = fake_backend("local")
    proxy = start_proxy(config(tmp_path, url, upstream[1]), master_key=MASTER)
    hi = [{"role": "user", "content": "hi"}]
    assert client(proxy, MASTER).messages.create(model=HAIKU, max_tokens=8, messages=hi).content  # Bearer
    by_header = httpx.post(proxy.url + "/v1/messages", headers={"x-api-key": MASTER},
                           json={"model": HAIKU, "max_tokens": 8, "messages": hi})
    assert by_header.status_code == 200 and by_header.json()["type"] == "message"
    with pytest.raises(anthropic.AuthenticationError) as e:
        client(proxy, "sk-wrong").messages.create(model=HAIKU, max_tokens=8, messages=hi)
    assert e.value.status_code == 401 and e.value.body["error"]["type"] == "authentication_error"  # type: ignore[index]
    assert _error(httpx.post(proxy.url + "/v1/messages", headers={"x-api-key": "sk-wrong"},
                             json={"model": HAIKU, "max_tokens": 8, "messages": hi})) == (401, "authentication_error")

    keys = KeyStore(UsageStore.open())
    limited, _ = keys.create(name="t", aliases=["dead"])
    with pytest.raises(anthropic.PermissionDeniedError) as denied:
        client(proxy, limited).messages.create(model=HAIKU, max_tokens=8, messages=hi)
    assert denied.value.body["error"]["type"] == "permission_error"  # type: ignore[index]
    with pytest.raises(anthropic.PermissionDeniedError):  # nor may it have a count from the alias
        client(proxy, limited).messages.count_tokens(model=HAIKU, messages=hi)
    rated, _ = keys.create(name="r", rpm=1)
    assert client(proxy, rated).messages.create(model=HAIKU, max_tokens=8, messages=hi).content
    with pytest.raises(anthropic.RateLimitError) as limited_e:
        client(proxy, rated).messages.create(model=HAIKU, max_tokens=8, messages=hi)
    assert limited_e.value.body["error"]["type"] == "rate_limit_error"  # type: ignore[index]


# --- passed through to Anthropic ---------------------------------------------------------------------------

def test_unmapped_claude_model_passes_through_unchanged(setup) -> None:  # type: ignore[no-untyped-def]
    proxy, backend, fake = setup
    raw = (b'{"model": "claude-sonnet-4-5",  "max_tokens": 32, "messages": [{"role": "user", "content": "hi"}],'
           b' "metadata": {"user_id": "u1"}, "future_field": {"kept": true}}')
    r = httpx.post(proxy.url + "/v1/messages?beta=true", content=raw, headers={
        "content-type": "application/json", "x-api-key": CLAUDE_KEY, "anthropic-version": "2023-06-01",
        "anthropic-beta": "claude-code-20250219,prompt-caching-2024-07-31"})
    assert r.status_code == 200, r.text
    assert r.json()["content"][0]["text"] == "answer from claude" and r.json()["id"] == "msg_fake01"
    assert r.headers["request-id"] == "req_fake01" and r.headers["anthropic-organization-id"] == "org-1"
    assert r.headers["x-delegate-served-by"] == "anthropic/claude-sonnet-4-5"
    assert fake.bodies == [raw] and fake.paths == ["/v1/messages?beta=true"]  # byte for byte, query and all
    sent = fake.headers[0]
    assert sent["x-api-key"] == CLAUDE_KEY and sent["anthropic-version"] == "2023-06-01"
    assert sent["anthropic-beta"] == "claude-code-20250219,prompt-caching-2024-07-31"
    assert "authorization" not in sent and backend.requests == []
    row = wait_rows(1)[0]
    assert (row["alias"], row["model"], row["backend"], row["served_by"], row["fallbacks"]) == (
        SONNET, "anthropic/claude-sonnet-4-5", "anthropic", "anthropic", 0)
    assert row["prompt_tokens"] == USAGE["input_tokens"] + USAGE["cache_creation_input_tokens"] + \
        USAGE["cache_read_input_tokens"] and row["completion_tokens"] == USAGE["output_tokens"]
    assert row["cache_creation_tokens"] == USAGE["cache_creation_input_tokens"]
    assert row["cache_read_tokens"] == USAGE["cache_read_input_tokens"]
    price = sum(litellm.cost_per_token(model=SONNET, prompt_tokens=row["prompt_tokens"],
                                       completion_tokens=USAGE["output_tokens"],
                                       cache_creation_input_tokens=USAGE["cache_creation_input_tokens"],
                                       cache_read_input_tokens=USAGE["cache_read_input_tokens"]))
    assert row["local_cost"] == pytest.approx(price) and row["reference_cost"] == pytest.approx(price)
    assert row["saved"] == pytest.approx(0.0) and price > 0


def test_passthrough_stream_is_relayed_chunk_by_chunk(setup) -> None:  # type: ignore[no-untyped-def]
    proxy, _, fake = setup
    fake.gate = threading.Event()
    events = []
    with client(proxy, CLAUDE_KEY).messages.stream(model=SONNET, max_tokens=32,
                                                  messages=[{"role": "user", "content": "hi"}]) as stream:
        for ev in stream:
            events.append(ev.type)
            if len(events) == 1:
                assert ev.type == "message_start"  # arrived while Anthropic still holds the rest back
                fake.gate.set()
        final = stream.get_final_message()
    assert events[0] == "message_start" and "text" in events and final.content[0].text == "answer from claude"  # type: ignore[union-attr]
    assert final.usage.cache_read_input_tokens == USAGE["cache_read_input_tokens"]
    row = wait_rows(1)[0]
    assert row["stream"] and row["status"] == "success" and row["completion_tokens"] == USAGE["output_tokens"]
    assert row["cache_read_tokens"] == USAGE["cache_read_input_tokens"]


def test_delegate_key_is_never_forwarded(tmp_path: Path, fake_backend, start_proxy, upstream) -> None:  # type: ignore[no-untyped-def]
    """A caller signed in with its Delegate key gets the configured Anthropic key; with none, a clear 401."""
    fake, upstream_url = upstream
    _, url = fake_backend("local")
    hi = [{"role": "user", "content": "hi"}]
    bare = start_proxy(config(tmp_path, url, upstream_url), master_key=MASTER)
    with pytest.raises(anthropic.AuthenticationError) as e:
        client(bare, MASTER).messages.create(model=SONNET, max_tokens=8, messages=hi)
    assert "x-api-key" in e.value.message and "delegate.anthropic.api_key" in e.value.message
    assert fake.bodies == []
    # the Delegate key in Authorization, the caller's own Anthropic key in x-api-key (Claude Code with both
    # ANTHROPIC_AUTH_TOKEN and ANTHROPIC_API_KEY set)
    both = anthropic.Anthropic(base_url=bare.url, auth_token=MASTER, default_headers={"x-api-key": CLAUDE_KEY},
                               max_retries=0)
    assert both.messages.create(model=SONNET, max_tokens=8, messages=hi).content
    assert fake.headers[-1]["x-api-key"] == CLAUDE_KEY and "authorization" not in fake.headers[-1]

    (tmp_path / "k").mkdir()
    keyed = start_proxy(config(tmp_path / "k", url, upstream_url, {"api_key": CLAUDE_KEY}), master_key=MASTER)
    assert client(keyed, MASTER).messages.create(model=SONNET, max_tokens=8, messages=hi).content
    assert fake.headers[-1]["x-api-key"] == CLAUDE_KEY and MASTER not in json.dumps(fake.headers)
    # an open proxy: the SDK's api_key (sent as a Bearer token) is the caller's own Anthropic key, passed on as it came
    (tmp_path / "o").mkdir()
    open_proxy = start_proxy(config(tmp_path / "o", url, upstream_url))
    assert client(open_proxy, CLAUDE_KEY).messages.create(model=SONNET, max_tokens=8, messages=hi).content
    assert fake.headers[-1]["authorization"] == f"Bearer {CLAUDE_KEY}" and "x-api-key" not in fake.headers[-1]
    # a key that is not Anthropic's is never sent to the cloud
    with pytest.raises(anthropic.AuthenticationError):
        client(open_proxy, "sk-local").messages.create(model=SONNET, max_tokens=8, messages=hi)


def test_anthropics_own_errors_come_back_as_they_are(setup) -> None:  # type: ignore[no-untyped-def]
    proxy, _, _ = setup
    with pytest.raises(anthropic.AuthenticationError) as e:
        client(proxy, "sk-ant-wrong").messages.create(model=SONNET, max_tokens=8,
                                                      messages=[{"role": "user", "content": "hi"}])
    assert e.value.body["error"]["message"] == "invalid x-api-key"  # type: ignore[index]
    assert wait_rows(1)[0]["status"] == "error"


def test_unreachable_anthropic_is_an_anthropic_error(tmp_path: Path, fake_backend, start_proxy) -> None:  # type: ignore[no-untyped-def]
    _, url = fake_backend("local")
    proxy = start_proxy(config(tmp_path, url, f"http://127.0.0.1:{refused_port()}"))
    r = httpx.post(proxy.url + "/v1/messages", json={"model": SONNET, "max_tokens": 8, "messages": [
        {"role": "user", "content": "hi"}]}, headers={"x-api-key": CLAUDE_KEY})
    assert _error(r) == (502, "api_error") and "cannot reach Anthropic" in r.json()["error"]["message"]


# --- a tier whose local chain cannot answer falls back to the Claude model asked for ----------------------

def test_tier_falls_back_to_claude_when_every_local_deployment_is_down(tmp_path: Path, start_proxy, upstream) -> None:  # type: ignore[no-untyped-def]
    fake, upstream_url = upstream
    proxy = start_proxy(config(tmp_path, f"http://127.0.0.1:{refused_port()}/v1", upstream_url))
    raw = client(proxy, CLAUDE_KEY).messages.with_raw_response.create(
        model=HAIKU, max_tokens=8, messages=[{"role": "user", "content": "hi"}])
    assert raw.parse().content[0].text == "answer from claude"  # type: ignore[union-attr]
    assert raw.headers["x-delegate-alias"] == "quick" and raw.headers["x-delegate-served-by"] == f"anthropic/{HAIKU}"
    assert json.loads(fake.bodies[0])["model"] == HAIKU
    row = wait_rows(1)[0]
    assert (row["alias"], row["model"], row["status"]) == ("quick", f"anthropic/{HAIKU}", "success")
    assert row["fallbacks"] >= 1 and [a["ok"] for a in row["attempts"]][-1] is True
    assert any(not a["ok"] for a in row["attempts"])


def test_tier_falls_back_to_claude_when_the_request_is_too_long(tmp_path: Path, fake_backend, start_proxy,  # type: ignore[no-untyped-def]
                                                                 upstream) -> None:
    fake, upstream_url = upstream
    _, small = fake_backend("small", context=50)
    proxy = start_proxy(config(tmp_path, small, upstream_url))
    long = [{"role": "user", "content": "word " * 400}]
    with client(proxy, CLAUDE_KEY).messages.stream(model=HAIKU, max_tokens=8, messages=long) as s:
        assert "".join(s.text_stream) == "answer from claude"
    with pytest.raises(anthropic.BadRequestError) as e:  # without a key to fall back with: the local answer
        client(proxy).messages.create(model=HAIKU, max_tokens=8, messages=long)
    assert "longer" in e.value.message


def test_what_a_local_model_cannot_take(setup) -> None:  # type: ignore[no-untyped-def]
    proxy, backend, fake = setup
    image = [{"role": "user", "content": [
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}},
        {"type": "text", "text": "what is this?"}]}]
    with pytest.raises(anthropic.BadRequestError) as e:
        client(proxy).messages.create(model="quick", max_tokens=8, messages=image)
    assert "text only" in e.value.message
    # through the haiku tier with a key: Claude takes it
    assert client(proxy, CLAUDE_KEY).messages.create(model=HAIKU, max_tokens=8, messages=image).content
    assert json.loads(fake.bodies[-1])["messages"] == image and backend.requests == []


# --- count_tokens and the model list -------------------------------------------------------------------------

def test_count_tokens(setup) -> None:  # type: ignore[no-untyped-def]
    proxy, backend, fake = setup
    c = client(proxy, CLAUDE_KEY)
    hi = [{"role": "user", "content": "hi"}]
    assert c.messages.count_tokens(model=SONNET, messages=hi).input_tokens == 4242
    assert fake.paths == ["/v1/messages/count_tokens"]
    # the haiku tier would be served by an OpenAI-compatible server, which cannot count: an error, not a 0, and
    # not Anthropic's count either (the request would not go there)
    with pytest.raises(anthropic.NotFoundError) as e:
        c.messages.count_tokens(model=HAIKU, messages=hi)
    assert "token counting is not available" in e.value.message and "openai/local-model" in e.value.message
    assert fake.paths == ["/v1/messages/count_tokens"] and backend.requests == []
    with pytest.raises(anthropic.BadRequestError):  # checked as /v1/messages checks it
        c.messages.count_tokens(model=HAIKU, messages=[])


def _tinygrad_chain(tmp_path: Path, head: str, then: list[tuple[Any, ...]], upstream_url: str) -> Path:
    """`quick`: a tinygrad deployment at `head`, then `then` as its fallbacks."""
    deployments = [("quick", "tinygrad/smollm2", head), *then]
    return write_config(tmp_path / "c.yaml", deployments, fallbacks={"quick": [d[0] for d in then]} if then else None,
                        aliases=["quick"], delegate={"anthropic": {"base_url": upstream_url}})


def test_count_tokens_goes_past_what_cannot_be_reached_to_what_would_serve(tmp_path: Path, fake_backend, start_proxy,  # type: ignore[no-untyped-def]
                                                                           upstream) -> None:
    """A tinygrad backend that refuses the connection is passed over, as serving passes it over; the Ollama
    behind it would serve the request, and has no count: an error naming it."""
    fake, upstream_url = upstream
    _, ollama_url = fake_backend("ollama")
    refused = f"http://127.0.0.1:{refused_port()}"
    proxy = start_proxy(_tinygrad_chain(tmp_path, refused, [("slow", "ollama_chat/llama3.2:3b",
                                                                 ollama_url.removesuffix("/v1"))], upstream_url))
    r = httpx.post(proxy.url + "/v1/messages/count_tokens", headers={"x-api-key": CLAUDE_KEY},
                   json={"model": HAIKU, "messages": [{"role": "user", "content": "hi"}]})
    assert _error(r) == (404, "not_found_error")
    assert "ollama_chat/llama3.2:3b" in r.json()["error"]["message"] and "Ollama" in r.json()["error"]["message"]
    assert fake.paths == []


def test_count_tokens_with_nothing_local_reachable(tmp_path: Path, start_proxy, upstream) -> None:  # type: ignore[no-untyped-def]
    """Overloaded, as /v1/messages would answer; through a Claude tier with a key, Anthropic counts, since that is
    where the request would go."""
    fake, upstream_url = upstream
    proxy = start_proxy(_tinygrad_chain(tmp_path, f"http://127.0.0.1:{refused_port()}", [], upstream_url))
    hi = [{"role": "user", "content": "hi"}]
    r = httpx.post(proxy.url + "/v1/messages/count_tokens", json={"model": HAIKU, "messages": hi})
    assert _error(r) == (529, "overloaded_error") and "cannot count tokens now" in r.json()["error"]["message"]
    assert "retry-after" in r.headers
    assert client(proxy, CLAUDE_KEY).messages.count_tokens(model=HAIKU, messages=hi).input_tokens == 4242
    assert fake.paths == ["/v1/messages/count_tokens"] and json.loads(fake.bodies[0])["model"] == HAIKU
    with pytest.raises(anthropic.InternalServerError):  # an alias by name has no Claude model to go to
        client(proxy, CLAUDE_KEY).messages.count_tokens(model="quick", messages=hi)


def test_count_tokens_on_the_real_backend_skips_what_cools_down(tmp_path: Path, bundled_backend: str, fake_backend,  # type: ignore[no-untyped-def]
                                                                start_proxy, upstream) -> None:
    from proxy.routing.router import cool_down

    _, url = fake_backend("other")
    proxy = start_proxy(_tinygrad_chain(tmp_path, bundled_backend, [("other", "openai/other", url)], upstream[1]))
    question = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]
    raw = client(proxy).messages.with_raw_response.count_tokens(model=HAIKU, messages=question)
    assert raw.parse().input_tokens == 42  # the backend's own count of this prompt (tests/tinygrad_backend)
    assert raw.headers["x-delegate-served-by"] == "tinygrad/smollm2"
    # longer than the backend's 512 tokens: where a key lets the tier go to Claude, Claude counts; without one
    # the request would be refused as too long, and the count says how long it is
    long = [{"role": "user", "content": "word " * 600}]
    assert client(proxy, CLAUDE_KEY).messages.count_tokens(model=HAIKU, messages=long).input_tokens == 4242
    assert client(proxy).messages.count_tokens(model=HAIKU, messages=long).input_tokens > 512
    state = proxy.server.config.app.state.proxy
    cool_down(state.router, state.chain_ids["quick"][0], "test", 60)
    with pytest.raises(anthropic.NotFoundError) as e:  # the Router would serve it by `other` now
        client(proxy).messages.count_tokens(model=HAIKU, messages=question)
    assert "openai/other" in e.value.message


def test_the_count_reaches_the_backend_with_its_key(tmp_path: Path) -> None:
    """The deployment's api_base (with or without /v1) and api_key, on the real backend app behind its key."""
    import asyncio

    from proxy import settings
    from proxy.server.app import create_app
    from proxy.server.errors import ProxyError
    from proxy.server.token_count import TokenCounter
    from tests.tinygrad_backend.loading_backend import loading_backend

    key = "sk-backend-test"
    with loading_backend(tmp_path, api_key=key) as url:
        async def count(api_key: str) -> Any:
            path = write_config(tmp_path / f"{api_key}.yaml",
                                [("quick", "tinygrad/smollm2", url + "/v1", {"api_key": api_key})], aliases=["quick"])
            async with httpx.AsyncClient() as http:
                counter = TokenCounter(create_app(settings.load(path), None).state.proxy, lambda: http)
                return await counter.count("quick", {"messages": [{"role": "user", "content": "hi"}]})

        counted = asyncio.run(count(key))
        assert counted.tokens > 0 and counted.context == 64 and counted.fits
        with pytest.raises(ProxyError) as e:  # a wrong key fails the request too: passed over, and nothing is left
            asyncio.run(count("sk-wrong"))
        assert e.value.status == 503 and "HTTP 401" in e.value.message


def test_model_list_in_anthropics_shape_for_anthropic_clients(setup) -> None:  # type: ignore[no-untyped-def]
    proxy, _, _ = setup
    page = client(proxy).models.list()
    ids = [m.id for m in page.data]
    assert any(i.startswith("claude-haiku-4-5") for i in ids) and SONNET in ids and "quick" in ids
    assert all(m.type == "model" for m in page.data)
    haiku = next(m for m in page.data if m.id == HAIKU)
    assert "quick" in haiku.display_name
    openai_shape = httpx.get(proxy.url + "/v1/models").json()
    assert openai_shape["object"] == "list" and openai_shape["data"][0]["object"] == "model"


# --- the books: Claude spend through Delegate next to the delegated work --------------------------------------

def test_savings_report_shows_claude_spend_next_to_delegated_work(setup) -> None:  # type: ignore[no-untyped-def]
    from proxy.usage import report

    proxy, _, _ = setup
    hi = [{"role": "user", "content": "hi"}]
    client(proxy, CLAUDE_KEY).messages.create(model=SONNET, max_tokens=8, messages=hi)  # passed through
    client(proxy).messages.create(model=HAIKU, max_tokens=8, messages=hi)  # delegated
    rows = wait_rows(2)
    through = next(r for r in rows if r["served_by"] == "anthropic")
    local = next(r for r in rows if r["served_by"] != "anthropic")
    assert (through["requested_model"], local["requested_model"], local["source"]) == (SONNET, HAIKU, "messages")
    t = report.build(rows, None, report.datetime.now(report.UTC)).total
    a, b, c = through["local_cost"], local["reference_cost"], local["local_cost"]
    assert t.claude_calls == 1 and t.claude_spend == pytest.approx(a) and a > 0
    assert t.reference_cost == pytest.approx(b) and t.local_cost == pytest.approx(c)
    assert t.saved == pytest.approx(b - c) and t.saved_share_pct == pytest.approx(100 * (b - c) / (a + b))
    text = report.render_table(report.build(rows, None, report.datetime.now(report.UTC), by="tier"))
    assert "Claude spend through Delegate" in text and "Delegated work Claude would have cost" in text
    assert "haiku" in text and "sonnet" in text and "Claude spend" in text
    ui = httpx.get(proxy.url + "/ui/data").json()
    assert ui["total"]["claude_spend"] == pytest.approx(a) and set(ui["by_tier"]) == {"haiku", "sonnet"}
    days = httpx.get(proxy.url + "/global/spend/report", params={"group_by": "tier"}).json()
    tiers = {e["tier"]: e for e in days[0]["tiers"]}
    assert tiers["sonnet"]["total_claude_spend"] == pytest.approx(a) and tiers["haiku"]["total_claude_spend"] == 0
    logs = {e["request_id"]: e for e in httpx.get(proxy.url + "/spend/logs").json()}
    entry = logs[through["request_id"]]
    assert entry["call_type"] == "anthropic_messages" and entry["metadata"]["passed_through"]
    assert entry["metadata"]["cache_read_input_tokens"] == USAGE["cache_read_input_tokens"]


def test_a_local_stream_that_dies_ends_with_anthropics_error_event(tmp_path: Path, fake_backend, start_proxy,  # type: ignore[no-untyped-def]
                                                                  upstream) -> None:
    _, url = fake_backend("dying", mode="die")
    proxy = start_proxy(config(tmp_path, url, upstream[1]))
    with httpx.stream("POST", proxy.url + "/v1/messages", json={
            "model": "quick", "max_tokens": 64, "stream": True, "messages": [{"role": "user", "content": "hi"}]}) as r:
        text = r.read().decode()
    last = text.strip().split("\n\n")[-1].split("\n")
    assert last[0] == "event: error"
    assert json.loads(last[1].removeprefix("data: "))["error"]["type"] == "api_error"
    assert "message_stop" not in text  # no client takes the cut answer for a whole one
    row = wait_rows(1)[0]
    assert row["status"] == "partial" and row["completion_tokens"] >= 1


def test_router_errors_on_these_routes_are_anthropics_too(setup) -> None:  # type: ignore[no-untyped-def]
    proxy, _, _ = setup
    assert _error(httpx.get(proxy.url + "/v1/messages")) == (405, "invalid_request_error")
    assert _error(httpx.post(proxy.url + "/v1/messages/batches", json={})) == (404, "not_found_error")


def test_a_budgeted_key_pays_what_anthropic_charged(tmp_path: Path, fake_backend, start_proxy, upstream) -> None:  # type: ignore[no-untyped-def]
    from proxy.usage.keys import KeyStore

    _, url = fake_backend("local")
    proxy = start_proxy(config(tmp_path, url, upstream[1], {"api_key": CLAUDE_KEY}), master_key=MASTER)
    keys = KeyStore(UsageStore.open())
    key, issued = keys.create(name="b", budget_usd=5.0)
    client(proxy, key).messages.create(model=SONNET, max_tokens=8, messages=[{"role": "user", "content": "hi"}])
    row = wait_rows(1)[0]
    deadline = time.monotonic() + 10
    while (current := keys.get(issued.key_id)) is not None and current.reserved_usd > 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert current is not None and current.reserved_usd == pytest.approx(0.0)
    assert current.spent_usd == pytest.approx(row["local_cost"]) and row["local_cost"] > 0
