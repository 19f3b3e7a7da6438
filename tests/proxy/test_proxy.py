"""The proxy end to end: the real app under uvicorn, the real openai SDK, fake OpenAI-compatible backends.

The fake backends stand in for Ollama and other servers (tests/fake_backend.py); the tinygrad backend
has its own tests (test_tinygrad_provider.py, tests/test_end_to_end.py).
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import httpx
import openai
import pytest

from tests.conftest import write_config
from tests.servers import refused_port

MSG = [{"role": "user", "content": "hello"}]


def client(url: str, key: str = "sk-anything") -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0)


@pytest.fixture
def two_backends(tmp_path: Path, fake_backend, start_proxy):  # type: ignore[no-untyped-def]
    """alias `coding`: a backend that answers; alias `chat`: a refused port, then that backend."""
    backend, url = fake_backend("ollama-ish")
    dead = f"http://127.0.0.1:{refused_port()}/v1"
    config = write_config(tmp_path / "c.yaml", [("coding", "openai/qwen-coder", url), ("chat", "openai/dead-model", dead),
                                                ("fallback-model", "openai/small", url)],
                          fallbacks={"chat": ["fallback-model"]}, aliases=["coding", "chat"])
    return backend, start_proxy(config)


def test_alias_is_served_and_says_who_answered(two_backends) -> None:  # type: ignore[no-untyped-def]
    backend, proxy = two_backends
    raw = client(proxy.url).chat.completions.with_raw_response.create(model="coding", messages=MSG)
    r = raw.parse()
    assert r.choices[0].message.content == "answer from ollama-ish"
    assert r.model == "openai/qwen-coder"
    assert raw.headers["x-delegate-alias"] == "coding"
    assert raw.headers["x-delegate-served-by"] == "openai/qwen-coder"
    assert raw.headers["x-delegate-fallbacks"] == "0"
    assert r.usage is not None and r.usage.completion_tokens == 3
    assert backend.requests[-1]["model"] == "qwen-coder"


def test_fallback_from_a_refused_port(two_backends) -> None:  # type: ignore[no-untyped-def]
    _, proxy = two_backends
    raw = client(proxy.url).chat.completions.with_raw_response.create(model="chat", messages=MSG)
    assert raw.parse().model == "openai/small"
    assert raw.headers["x-delegate-served-by"] == "openai/small"
    assert raw.headers["x-delegate-fallbacks"] == "1"


def test_streaming_fallback_and_headers(two_backends) -> None:  # type: ignore[no-untyped-def]
    _, proxy = two_backends
    with client(proxy.url).chat.completions.with_streaming_response.create(model="chat", messages=MSG, stream=True) as raw:
        assert raw.headers["x-delegate-served-by"] == "openai/small"
        assert raw.headers["x-delegate-fallbacks"] == "1"
        chunks = list(raw.parse())
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "answer from ollama-ish"
    assert all(c.usage is None for c in chunks)  # not asked for


def test_stream_include_usage_and_done(two_backends) -> None:  # type: ignore[no-untyped-def]
    _, proxy = two_backends
    body = {"model": "coding", "messages": MSG, "stream": True, "stream_options": {"include_usage": True}}
    lines = [line for line in httpx.post(proxy.url + "/v1/chat/completions", json=body).text.splitlines() if line]
    assert lines[-1] == "data: [DONE]"
    usage = json.loads(lines[-2][6:])
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 3


def test_async_client(two_backends) -> None:  # type: ignore[no-untyped-def]
    _, proxy = two_backends

    async def go() -> list[str]:
        c = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0)
        plain = await c.chat.completions.create(model="coding", messages=MSG)
        stream = await c.chat.completions.create(model="chat", messages=MSG, stream=True)
        text = "".join([ch.choices[0].delta.content or "" async for ch in stream if ch.choices])
        return [plain.choices[0].message.content or "", text]

    assert asyncio.run(go()) == ["answer from ollama-ish", "answer from ollama-ish"]


def test_parameters_pass_through(two_backends) -> None:  # type: ignore[no-untyped-def]
    backend, proxy = two_backends
    tools = [{"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}]
    client(proxy.url).chat.completions.create(model="coding", messages=MSG, tools=tools, stop=["\n"], temperature=0.3,  # type: ignore[arg-type]
                                              max_tokens=7, seed=11, user="alice")
    sent = backend.requests[-1]
    assert sent["tools"] == tools
    assert (sent["stop"], sent["temperature"], sent["max_tokens"], sent["seed"]) == (["\n"], 0.3, 7, 11)
    # LiteLLM drops `user` for OpenAI-compatible servers outside OpenAI's catalog (not all accept it);
    # the tinygrad provider forwards it: test_tinygrad_provider.py


def test_user_reaches_a_tinygrad_deployment(tmp_path: Path, fake_backend, start_proxy) -> None:  # type: ignore[no-untyped-def]
    backend, url = fake_backend("tg")  # speaks the tinygrad backend's /v1/chat/completions
    proxy = start_proxy(write_config(tmp_path / "c.yaml", [("quick", "tinygrad/tg", url.removesuffix("/v1"))]))
    client(proxy.url).chat.completions.create(model="quick", messages=MSG, user="alice", seed=3, max_tokens=5)
    assert (backend.requests[-1]["user"], backend.requests[-1]["seed"], backend.requests[-1]["max_tokens"]) == ("alice", 3, 5)


def test_legacy_completions(two_backends) -> None:  # type: ignore[no-untyped-def]
    _, proxy = two_backends
    r = client(proxy.url).completions.create(model="coding", prompt="Say hi")
    assert r.object == "text_completion" and r.choices[0].text == "answer from ollama-ish"


def test_models_lists_aliases_and_deployments(two_backends) -> None:  # type: ignore[no-untyped-def]
    _, proxy = two_backends
    data = httpx.get(proxy.url + "/v1/models").json()["data"]
    by_id = {m["id"]: m for m in data}
    assert set(by_id) == {"coding", "chat", "fallback-model"}
    assert by_id["chat"]["kind"] == "alias" and by_id["chat"]["fallbacks"] == ["fallback-model"]
    assert by_id["fallback-model"]["kind"] == "model" and by_id["fallback-model"]["deployments"] == ["openai/small"]
    assert [m.id for m in client(proxy.url).models.list().data] == ["coding", "chat", "fallback-model"]


def test_context_window_fallback(tmp_path: Path, fake_backend, start_proxy) -> None:  # type: ignore[no-untyped-def]
    small, small_url = fake_backend("small", context=10)
    _, big_url = fake_backend("big", context=100_000)
    config = write_config(tmp_path / "c.yaml", [("quick", "openai/small", small_url), ("big-context", "openai/big", big_url)],
                          context_fallbacks={"quick": ["big-context"]}, aliases=["quick"])
    proxy = start_proxy(config)
    raw = client(proxy.url).chat.completions.with_raw_response.create(
        model="quick", messages=[{"role": "user", "content": "long " * 100}])
    assert raw.parse().choices[0].message.content == "answer from big"
    assert raw.headers["x-delegate-served-by"] == "openai/big"
    assert len(small.requests) == 1  # it was asked, said too long, and the request moved on


def test_stalled_deployment_times_out_and_falls_back(tmp_path: Path, fake_backend, start_proxy) -> None:  # type: ignore[no-untyped-def]
    _, slow_url = fake_backend("slow", mode="stall")
    _, ok_url = fake_backend("ok")
    config = write_config(tmp_path / "c.yaml", [("quick", "openai/slow", slow_url, {"timeout": 1, "stream_timeout": 1}),
                                                ("ok-model", "openai/ok", ok_url)],
                          fallbacks={"quick": ["ok-model"]}, aliases=["quick"])
    proxy = start_proxy(config)
    raw = client(proxy.url).chat.completions.with_raw_response.create(model="quick", messages=MSG)
    assert raw.headers["x-delegate-served-by"] == "openai/ok"


def test_stream_failing_before_first_token_falls_back(tmp_path: Path, fake_backend, start_proxy) -> None:  # type: ignore[no-untyped-def]
    _, bad_url = fake_backend("overloaded", mode="unavailable")
    _, ok_url = fake_backend("ok")
    config = write_config(tmp_path / "c.yaml", [("quick", "openai/overloaded", bad_url), ("ok-model", "openai/ok", ok_url)],
                          fallbacks={"quick": ["ok-model"]}, aliases=["quick"])
    proxy = start_proxy(config)
    with client(proxy.url).chat.completions.with_streaming_response.create(model="quick", messages=MSG, stream=True) as raw:
        assert raw.headers["x-delegate-served-by"] == "openai/ok"
        text = "".join(c.choices[0].delta.content or "" for c in raw.parse() if c.choices)
    assert text == "answer from ok"


def test_stream_dying_mid_way_ends_with_an_error_event(tmp_path: Path, fake_backend, start_proxy) -> None:  # type: ignore[no-untyped-def]
    _, url = fake_backend("flaky", mode="die")
    proxy = start_proxy(write_config(tmp_path / "c.yaml", [("quick", "openai/flaky", url)], aliases=["quick"]))
    body = {"model": "quick", "messages": MSG, "stream": True}
    lines = [line for line in httpx.post(proxy.url + "/v1/chat/completions", json=body).text.splitlines() if line]
    assert lines[-1] == "data: [DONE]"
    error = json.loads(lines[-2][6:])
    assert error["error"]["code"] == "stream_interrupted"
    with pytest.raises(openai.APIError):  # the SDK raises on the error event: no truncated answer passes as whole
        list(client(proxy.url).chat.completions.create(model="quick", messages=MSG, stream=True))


def test_every_backend_unreachable_is_503_with_retry_after(tmp_path: Path, start_proxy) -> None:  # type: ignore[no-untyped-def]
    dead = [f"http://127.0.0.1:{refused_port()}/v1" for _ in range(2)]
    config = write_config(tmp_path / "c.yaml", [("quick", "openai/a", dead[0]), ("last", "openai/b", dead[1])],
                          fallbacks={"quick": ["last"]}, aliases=["quick"])
    proxy = start_proxy(config)
    for _ in range(2):
        r = httpx.post(proxy.url + "/v1/chat/completions", json={"model": "quick", "messages": MSG})
        assert r.status_code == 503, r.text
        assert int(r.headers["retry-after"]) >= 1
        assert (r.headers["x-delegate-served-by"], r.headers["x-delegate-fallbacks"]) == ("none", "1")
        assert r.json()["error"]["code"] == "backends_unreachable"


def test_every_deployment_cooling_down_is_429_with_retry_after(tmp_path: Path, start_proxy) -> None:  # type: ignore[no-untyped-def]
    dead = [f"http://127.0.0.1:{refused_port()}/v1" for _ in range(2)]
    config = write_config(tmp_path / "c.yaml", [("quick", "openai/a", dead[0]), ("quick", "openai/b", dead[1])],
                          aliases=["quick"], router={"allowed_fails": 0, "cooldown_time": 60})
    proxy = start_proxy(config)
    statuses = []
    for _ in range(4):
        r = httpx.post(proxy.url + "/v1/chat/completions", json={"model": "quick", "messages": MSG})
        statuses.append(r.status_code)
    assert statuses[0] == 503 and statuses[-1] == 429
    assert 1 <= int(r.headers["retry-after"]) <= 60
    assert r.json()["error"]["code"] == "deployments_cooling_down"
    health = httpx.get(proxy.url + "/health").json()
    assert all(d["cooldown_remaining_s"] for d in health["deployments"])


def test_health_endpoints(two_backends) -> None:  # type: ignore[no-untyped-def]
    _, proxy = two_backends
    assert httpx.get(proxy.url + "/health/liveliness").status_code == 200
    ready = httpx.get(proxy.url + "/health/readiness")
    assert ready.status_code == 200 and ready.json()["status"] == "ready"
    deployments = {d["id"]: d for d in httpx.get(proxy.url + "/health").json()["deployments"]}
    assert deployments["coding#0"]["status"] == "ready"
    assert deployments["chat#1"]["status"] == "unreachable"


def test_readiness_fails_when_nothing_is_reachable(tmp_path: Path, start_proxy) -> None:  # type: ignore[no-untyped-def]
    dead = f"http://127.0.0.1:{refused_port()}/v1"
    proxy = start_proxy(write_config(tmp_path / "c.yaml", [("quick", "openai/a", dead)], aliases=["quick"]))
    r = httpx.get(proxy.url + "/health/readiness")
    assert r.status_code == 503 and "no deployment is reachable" in r.json()["problems"]


def test_tinygrad_stream_failing_before_first_token_falls_back(tmp_path: Path, fake_backend, start_proxy) -> None:  # type: ignore[no-untyped-def]
    """LiteLLM falls back when a custom provider's stream fails before its first chunk; check it does."""
    _, ok_url = fake_backend("ok")
    dead = f"http://127.0.0.1:{refused_port()}"
    config = write_config(tmp_path / "c.yaml", [("heavy", "tinygrad/smollm2", dead), ("smollm2", "tinygrad/ok",
                                                                                     ok_url.removesuffix("/v1"))],
                          fallbacks={"heavy": ["smollm2"]}, aliases=["heavy"])
    proxy = start_proxy(config)
    with client(proxy.url).chat.completions.with_streaming_response.create(model="heavy", messages=MSG, stream=True) as raw:
        assert raw.headers["x-delegate-served-by"] == "tinygrad/ok"
        assert raw.headers["x-delegate-fallbacks"] == "1"
        text = "".join(c.choices[0].delta.content or "" for c in raw.parse() if c.choices)
    assert text == "answer from ok"
