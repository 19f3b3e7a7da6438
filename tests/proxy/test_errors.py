"""Every client mistake gets OpenAI's error shape and the right 4xx; nothing leaks a traceback or a key."""

from __future__ import annotations

import logging
from pathlib import Path

import httpx
import openai
import pytest

from tests.conftest import write_config
from tests.servers import refused_port

MSG = [{"role": "user", "content": "hello"}]
MASTER = "sk-master-test-0123456789"


@pytest.fixture
def proxy(tmp_path: Path, fake_backend, start_proxy):  # type: ignore[no-untyped-def]
    _, url = fake_backend("ok")
    config = write_config(tmp_path / "c.yaml", [("coding", "openai/ok", url), ("quick", "openai/ok", url)],
                          aliases=["coding", "quick"], delegate={"max_request_bytes": 4096})
    return start_proxy(config, master_key=MASTER)


def post(proxy, body=None, content=None, headers=None):  # type: ignore[no-untyped-def]
    h = {"authorization": f"Bearer {MASTER}", **(headers or {})}
    if content is not None:
        return httpx.post(proxy.url + "/v1/chat/completions", content=content, headers={"content-type": "application/json", **h})
    return httpx.post(proxy.url + "/v1/chat/completions", json=body, headers=h)


def assert_error(r: httpx.Response, status: int, param: str | None = None, code: str | None = None) -> dict:
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"] and "Traceback" not in r.text
    if param is not None:
        assert error["param"] == param
    if code is not None:
        assert error["code"] == code
    return error


@pytest.mark.parametrize(("body", "param"), [
    ({"messages": MSG}, "model"),
    ({"model": 7, "messages": MSG}, "model"),
    ({"model": "coding"}, "messages"),
    ({"model": "coding", "messages": []}, "messages"),
    ({"model": "coding", "messages": "hello"}, "messages"),
    ({"model": "coding", "messages": [{"role": "robot", "content": "x"}]}, "messages[0].role"),
    ({"model": "coding", "messages": [{"role": "user", "content": 42}]}, "messages[0].content"),
    ({"model": "coding", "messages": [{"role": "user"}]}, "messages[0].content"),
    ({"model": "coding", "messages": MSG, "max_tokens": -5}, "max_tokens"),
    ({"model": "coding", "messages": MSG, "max_tokens": 0}, "max_tokens"),
    ({"model": "coding", "messages": MSG, "max_tokens": 2.5}, "max_tokens"),
    ({"model": "coding", "messages": MSG, "max_tokens": "10"}, "max_tokens"),
    ({"model": "coding", "messages": MSG, "max_tokens": 10**12}, "max_tokens"),
    ({"model": "coding", "messages": MSG, "temperature": 2.5}, "temperature"),
    ({"model": "coding", "messages": MSG, "temperature": -1}, "temperature"),
    ({"model": "coding", "messages": MSG, "temperature": "hot"}, "temperature"),
    ({"model": "coding", "messages": MSG, "stream_options": {"include_usage": True}}, "stream_options"),
    ({"model": "coding", "messages": MSG, "stream": "yes"}, "stream"),
    ({"model": "coding", "messages": MSG, "n": 3}, "n"),
    ({"model": "coding", "messages": MSG, "tools": [{"type": "function"}]}, "tools[0]"),
    ({"model": "coding", "messages": MSG, "api_base": "http://169.254.169.254/"}, "api_base"),
    ({"model": "coding", "messages": MSG, "base_url": "http://evil.example/"}, "base_url"),
    ({"model": "coding", "messages": MSG, "api_key": "sk-stolen"}, "api_key"),
    ({"model": "coding", "messages": MSG, "mock_response": "fake"}, "mock_response"),
    ({"model": "coding", "messages": MSG, "frobnicate": 1}, "frobnicate"),
])
def test_bad_fields_are_400(proxy, body: dict, param: str) -> None:  # type: ignore[no-untyped-def]
    assert_error(post(proxy, body), 400, param=param)


@pytest.mark.parametrize("content", [b"{not json", b"", b"   ", b"[1, 2]", b'{"model": NaN}', b"\xff\xfe{}",
                                     b"[" * 100_000 + b"]" * 100_000])
def test_malformed_bodies_are_400(proxy, content: bytes) -> None:  # type: ignore[no-untyped-def]
    # the deep one is over the 4 KiB limit of this proxy: 413 is also a clear answer
    r = post(proxy, content=content)
    assert r.status_code in ((400, 413) if len(content) > 4096 else (400,))
    assert_error(r, r.status_code)


def test_deep_nesting_under_the_limit_is_400(tmp_path: Path, fake_backend, start_proxy) -> None:  # type: ignore[no-untyped-def]
    _, url = fake_backend("ok")
    proxy = start_proxy(write_config(tmp_path / "c.yaml", [("coding", "openai/ok", url)]))
    deep = b'{"model": "coding", "messages": ' + b"[" * 200_000 + b"]" * 200_000 + b"}"
    r = httpx.post(proxy.url + "/v1/chat/completions", content=deep, headers={"content-type": "application/json"})
    assert_error(r, 400)


def test_unknown_model_is_404_listing_the_aliases(proxy) -> None:  # type: ignore[no-untyped-def]
    for model in ("gpt-4o", "../../etc/passwd", "http://evil.example/v1", "x" * 3000):
        error = assert_error(post(proxy, {"model": model, "messages": MSG}), 404, param="model", code="model_not_found")
        assert "coding, quick" in error["message"]
        assert len(error["message"]) < 300


def test_body_over_limit_is_413_with_content_length(proxy) -> None:  # type: ignore[no-untyped-def]
    r = post(proxy, {"model": "coding", "messages": [{"role": "user", "content": "x" * 10_000}]})
    assert_error(r, 413, code="request_too_large")


def test_body_over_limit_is_413_without_content_length(proxy) -> None:  # type: ignore[no-untyped-def]
    def chunks():  # type: ignore[no-untyped-def]
        yield b'{"model": "coding", "messages": [{"role": "user", "content": "'
        for _ in range(100):
            yield b"x" * 1000
        yield b'"}]}'

    r = httpx.post(proxy.url + "/v1/chat/completions", content=chunks(), headers={"authorization": f"Bearer {MASTER}"})
    assert_error(r, 413, code="request_too_large")


@pytest.mark.parametrize("header", [None, "Bearer wrong", "Basic abc", "Bearer", "Bearer " + "k" * 8000,
                                    "Bearer ' OR '1'='1; DROP TABLE keys; --", "Bearer sk-mästér".encode()])
def test_wrong_or_missing_key_is_401(proxy, header: str | bytes | None) -> None:  # type: ignore[no-untyped-def]
    headers = {"authorization": header} if header is not None else {}
    r = httpx.post(proxy.url + "/v1/chat/completions", json={"model": "coding", "messages": MSG}, headers=headers)
    assert_error(r, 401)
    assert httpx.get(proxy.url + "/v1/models", headers=headers).status_code == 401


def test_spoofed_host_header_changes_nothing(proxy) -> None:  # type: ignore[no-untyped-def]
    r = httpx.post(proxy.url + "/v1/chat/completions", json={"model": "coding", "messages": MSG},
                   headers={"host": "localhost:4000", "x-forwarded-host": "admin.internal"})
    assert_error(r, 401)


def test_the_right_key_works_with_the_sdk(proxy) -> None:  # type: ignore[no-untyped-def]
    c = openai.OpenAI(base_url=proxy.url + "/v1", api_key=MASTER, max_retries=0)
    assert c.chat.completions.create(model="coding", messages=MSG).choices[0].message.content == "answer from ok"  # type: ignore[arg-type]
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=proxy.url + "/v1", api_key="nope", max_retries=0).models.list()


def test_unknown_route_and_method(proxy) -> None:  # type: ignore[no-untyped-def]
    assert_error(httpx.get(proxy.url + "/v1/nothing"), 404)
    assert_error(httpx.get(proxy.url + "/v1/chat/completions"), 405)


def test_keys_never_reach_the_logs(proxy, caplog: pytest.LogCaptureFixture) -> None:  # type: ignore[no-untyped-def]
    caplog.set_level(logging.DEBUG)
    post(proxy, {"model": "coding", "messages": MSG})
    httpx.post(proxy.url + "/v1/chat/completions", json={"model": "coding", "messages": MSG},
               headers={"authorization": "Bearer sk-wrong-secret-value"})
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert MASTER not in text and "sk-wrong-secret-value" not in text and "sk-test" not in text


# --- the backends' failures, in our words ----------------------------------------------------------------

@pytest.fixture
def long_prompt_chain(tmp_path: Path, fake_backend, start_proxy):  # type: ignore[no-untyped-def]
    """The shipped config's shape: quick = llama3.2:3b on Ollama (down) -> smollm2 (a small context), and
    context_window_fallbacks smollm2 -> llama3.1:8b on Ollama (down)."""
    _, small = fake_backend("smollm2", context=512)
    ollama = f"http://127.0.0.1:{refused_port()}"
    config = write_config(tmp_path / "c.yaml", [("quick", "ollama_chat/llama3.2:3b", ollama),
                                                ("smollm2", "openai/smollm2", small),
                                                ("llama3.1:8b", "ollama_chat/llama3.1:8b", ollama, {"timeout": 5})],
                          aliases=["quick"], fallbacks={"quick": ["smollm2"]},
                          context_fallbacks={"smollm2": ["llama3.1:8b"]}, router={"num_retries": 1, "retry_after": 0})
    return start_proxy(config, master_key=MASTER)


RAW_PROVIDER_TEXT = ("Exception", "ssl:", "SSLContext", " at 0x", "Connect call failed", "litellm")


def test_a_prompt_too_long_for_what_is_reachable_is_400_naming_contexts(long_prompt_chain) -> None:  # type: ignore[no-untyped-def]
    words = " ".join(["word"] * 40_000)
    # LiteLLM backs off a few seconds before retrying a group of one deployment (num_retries: 1, as shipped)
    r = httpx.post(long_prompt_chain.url + "/v1/chat/completions", headers={"authorization": f"Bearer {MASTER}"},
                   json={"model": "quick", "messages": [{"role": "user", "content": words}]}, timeout=120)
    message = assert_error(r, 400, param="messages", code="context_length_exceeded")["message"]
    assert "512 tokens (openai/smollm2)" in message, message
    assert "could not be reached" in message and "ollama_chat/llama3.1:8b" in message, message
    assert not any(s in message for s in RAW_PROVIDER_TEXT), message
    with pytest.raises(openai.BadRequestError) as raised:
        openai.OpenAI(base_url=long_prompt_chain.url + "/v1", api_key=MASTER, max_retries=0, timeout=120).chat.completions.create(
            model="quick", messages=[{"role": "user", "content": words}])
    assert raised.value.code == "context_length_exceeded"


def test_a_prompt_too_long_for_every_model_says_the_largest_context(tmp_path: Path, fake_backend, start_proxy) -> None:  # type: ignore[no-untyped-def]
    _, small = fake_backend("small", context=10)
    _, big = fake_backend("big", context=50)
    config = write_config(tmp_path / "c.yaml", [("quick", "openai/small", small), ("big", "openai/big", big)],
                          aliases=["quick"], context_fallbacks={"quick": ["big"]})
    proxy = start_proxy(config, master_key=MASTER)
    error = assert_error(post(proxy, {"model": "quick", "messages": [{"role": "user", "content": "x" * 400}]}),
                         400, code="context_length_exceeded")
    assert error["message"] == ("the prompt (100 tokens) is longer than every model of 'quick' can take: the largest "
                                "context among them is 50 tokens (openai/big)")


def test_unreachable_backends_are_named_not_quoted(tmp_path: Path, start_proxy) -> None:  # type: ignore[no-untyped-def]
    ollama = f"http://127.0.0.1:{refused_port()}"
    config = write_config(tmp_path / "c.yaml", [("quick", "ollama_chat/llama3.2:3b", ollama)], aliases=["quick"])
    proxy = start_proxy(config, master_key=MASTER)
    error = assert_error(post(proxy, {"model": "quick", "messages": MSG}), 503, code="backends_unreachable")
    assert error["message"] == "no backend of this alias is reachable: cannot connect to ollama_chat/llama3.2:3b"
