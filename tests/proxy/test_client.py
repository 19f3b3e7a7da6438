"""The Python API the old scripts use, against the real proxy: the real model for the happy paths,
fake backends and a dead port for the failures."""

from __future__ import annotations

import concurrent.futures
from pathlib import Path

import pytest

from proxy.client import api as client
from tests.conftest import write_config
from tests.servers import refused_port

QUESTION = "What is the capital of France? Answer in one word."


@pytest.fixture
def at(monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    def point(url: str, key: str | None = None) -> None:
        monkeypatch.setenv("DELEGATE_URL", url)
        if key:
            monkeypatch.setenv("DELEGATE_API_KEY", key)
    return point


def test_delegate_answers_with_the_old_response_fields(real_proxy: str, at) -> None:  # type: ignore[no-untyped-def]
    at(real_proxy)
    r = client.delegate(QUESTION, task="quick", max_tokens=10, temperature=0)
    assert r.success and r.error is None
    assert "Paris" in r.text
    assert (r.model, r.backend, r.fallbacks) == ("smollm2", "tinygrad", 1)
    assert (r.check, r.escalations) == ("passed", 0)  # the shipped config checks every alias's answers
    assert 1 <= r.tokens <= 10 and r.latency_ms > 0 and r.tokens_per_sec > 0
    assert str(r) == r.text


def test_quick_helpers(real_proxy: str, at) -> None:  # type: ignore[no-untyped-def]
    at(real_proxy)
    assert "Paris" in client.quick_answer(QUESTION, max_tokens=10, temperature=0).text
    code = client.quick_code("Write a Python function that adds two numbers.", max_tokens=6, temperature=0)
    assert code.success and code.task == "coding" and code.tokens == 6
    summary = client.quick_analysis("Summarize: the build failed twice, then passed.", max_tokens=4, temperature=0)
    assert summary.success and summary.task == "analysis"
    assert client.is_proxy_running()


def test_batch_from_a_thread_pool(tmp_path: Path, fake_backend, start_proxy, at) -> None:  # type: ignore[no-untyped-def]
    _, url = fake_backend("ok")
    proxy = start_proxy(write_config(tmp_path / "c.yaml", [("coding", "openai/ok", url)]))
    at(proxy.url)
    with concurrent.futures.ThreadPoolExecutor(max_workers=3) as pool:
        results = list(pool.map(lambda i: client.delegate(f"review file{i}.py"), range(6)))
    assert [r.text for r in results] == ["answer from ok"] * 6
    assert len({r.request_id for r in results}) == 6


def test_network_failure_is_a_result_not_an_exception(at) -> None:  # type: ignore[no-untyped-def]
    at(f"http://127.0.0.1:{refused_port()}")
    r = client.delegate("hello", task="quick")
    assert not r.success and r.text == ""
    assert "cannot reach the Delegate proxy" in (r.error or "") and "make serve" in (r.error or "")
    assert not client.is_proxy_running()
    retried = client.delegate_with_retry("hello", task="quick", max_retries=1, backoff_s=0.01)
    assert not retried.success and retried.error


def test_backend_failure_is_a_result(tmp_path: Path, start_proxy, at) -> None:  # type: ignore[no-untyped-def]
    dead = f"http://127.0.0.1:{refused_port()}/v1"
    proxy = start_proxy(write_config(tmp_path / "c.yaml", [("coding", "openai/dead", dead)]))
    at(proxy.url)
    r = client.delegate("hello")
    assert not r.success and r.status_code == 503 and "HTTP 503" in (r.error or "")


def test_retry_asks_the_same_alias_whose_chain_is_the_fallback(tmp_path: Path, fake_backend, start_proxy,  # type: ignore[no-untyped-def]
                                                                at) -> None:
    other, other_url = fake_backend("quick-model")
    chained, chained_url = fake_backend("chained")
    dead = f"http://127.0.0.1:{refused_port()}/v1"
    proxy = start_proxy(write_config(tmp_path / "c.yaml", [("coding", "openai/dead", dead), ("quick", "openai/q", other_url),
                                                           ("review", "openai/dead", dead), ("next", "openai/c", chained_url)],
                                     aliases=["coding", "quick", "review"], fallbacks={"review": ["next"]}))
    at(proxy.url)
    r = client.delegate_with_retry("hello", task="coding", max_retries=2, backoff_s=0.01)
    assert not r.success and r.task == "coding" and r.status_code in (429, 503)
    assert other.requests == []  # no hop to another alias: config.yaml's chain decides
    chain = client.delegate_with_retry("hello", task="review", max_retries=2, backoff_s=0.01)
    assert chain.success and chain.task == "review" and chain.text == "answer from chained" and chain.fallbacks == 1


def test_an_alias_added_to_config_is_served_and_an_unknown_one_names_the_proxys(tmp_path: Path, fake_backend,  # type: ignore[no-untyped-def]
                                                                                 start_proxy, at) -> None:
    backend, url = fake_backend("ok")
    proxy = start_proxy(write_config(tmp_path / "c.yaml", [("summarize", "openai/ok", url), ("smollm2", "openai/ok", url)],
                                     aliases=["summarize"]))
    at(proxy.url)
    assert client.delegate("hello", task="summarize").text == "answer from ok"
    for task in ("coding", "smollm2"):  # a shipped alias this proxy lacks; a model, not a task alias
        with pytest.raises(ValueError, match="the proxy's aliases are summarize"):
            client.delegate("hello", task=task)
        with pytest.raises(ValueError):
            client.delegate_with_retry("hello", task=task, backoff_s=0.01)


def test_requests_name_the_python_api_as_their_source(fake_backend, at) -> None:  # type: ignore[no-untyped-def]
    backend, url = fake_backend("plain")  # an OpenAI-compatible server without aliases: the request decides
    at(url)
    assert client.delegate("hello", task="anything").success
    assert backend.headers[-1]["x-delegate-source"] == "api"


def test_client_errors_are_not_retried(tmp_path: Path, fake_backend, start_proxy, at) -> None:  # type: ignore[no-untyped-def]
    backend, url = fake_backend("small", context=5)  # every prompt is too long for it: a 400
    proxy = start_proxy(write_config(tmp_path / "c.yaml", [("coding", "openai/small", url)]))
    at(proxy.url)
    r = client.delegate_with_retry("a prompt that is far too long " * 10, task="coding", max_retries=3, backoff_s=0.01)
    assert not r.success and r.status_code == 400 and len(backend.requests) == 1


@pytest.mark.parametrize("prompt", ["", "   "])
def test_an_empty_prompt_raises(prompt: str, at) -> None:  # type: ignore[no-untyped-def]
    at(f"http://127.0.0.1:{refused_port()}")
    with pytest.raises(ValueError, match="the prompt is empty"):
        client.delegate(prompt, task="quick")
    with pytest.raises(ValueError):
        client.delegate_with_retry(prompt, task="quick")


def test_an_unknown_task_raises_only_when_the_proxy_answered(tmp_path: Path, fake_backend, start_proxy, at) -> None:  # type: ignore[no-untyped-def]
    _, url = fake_backend("ok")
    proxy = start_proxy(write_config(tmp_path / "c.yaml", [("coding", "openai/ok", url), ("quick", "openai/ok", url)],
                                     aliases=["coding", "quick"]))
    at(proxy.url)
    for task in ("poetry", "Coding"):
        with pytest.raises(ValueError, match=f"unknown task '{task}'; the proxy's aliases are coding, quick"):
            client.delegate("hi", task=task)
    at(f"http://127.0.0.1:{refused_port()}")
    down = client.delegate("hi", task="poetry")  # nobody to ask: a failed result, as any call to a dead proxy
    assert not down.success and "cannot reach the Delegate proxy" in (down.error or "")


def test_old_names_still_import() -> None:
    from proxy.client.api import (  # noqa: F401
        LLMResponse,
        delegate,
        delegate_with_retry,
        is_ollama_running,
        quick_analysis,
        quick_answer,
        quick_code,
        start_ollama,
    )

    assert [f for f in LLMResponse.__dataclass_fields__][:8] == [
        "text", "model", "backend", "latency_ms", "tokens", "tokens_per_sec", "success", "error"]


def test_client_does_not_import_litellm() -> None:
    import subprocess
    import sys

    code = "import sys, proxy.client; assert 'litellm' not in sys.modules"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True).returncode == 0


def test_start_proxy_starts_backend_and_proxy(tmp_path: Path, at) -> None:  # type: ignore[no-untyped-def]
    import os
    import signal
    import time

    import httpx

    from tests.conftest import shipped_config
    from tests.servers import free_port
    from tests.tinygrad_backend.tiny_gguf import write_tiny

    backend_port, proxy_port = free_port(), free_port()
    model = write_tiny(tmp_path / "smollm2.gguf", context=128)
    config = shipped_config(tmp_path / "config.yaml", f"http://127.0.0.1:{backend_port}",
                            {"model": str(model), "port": backend_port, "max_context": 64})
    at(f"http://127.0.0.1:{proxy_port}")
    assert not client.is_proxy_running()
    try:
        assert client.start_proxy(config=config, timeout=240)
        assert client.is_proxy_running()
        assert client.delegate("hello", task="quick", max_tokens=2).success
    finally:
        for pid in subprocess_pids(proxy_port):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 60  # the proxy drains, then stops the backend it started
    while time.monotonic() < deadline:
        try:
            httpx.get(f"http://127.0.0.1:{backend_port}/health", timeout=2)
            time.sleep(0.3)
        except httpx.ConnectError:
            break
    assert not client.is_proxy_running()
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"http://127.0.0.1:{backend_port}/health", timeout=2)


def subprocess_pids(port: int) -> list[int]:
    """The `delegate serve` process listening on `port` (started detached by start_proxy)."""
    import subprocess

    out = subprocess.run(["pgrep", "-f", f"proxy.client.cli serve .*--port {port}"], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]
