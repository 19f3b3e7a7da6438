"""The `tinygrad` provider maps the backend's failures to the exceptions LiteLLM's Router acts on.

Each case uses a real tinygrad_backend: the shared one (bundled model, 512-token context), the real
backend app held in its `loading` state, a port where nothing listens, and a socket that never answers.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Iterator
from pathlib import Path

import litellm
import pytest

from proxy.routing.tinygrad_provider import provider
from tests.servers import refused_port
from tests.tinygrad_backend.loading_backend import loading_backend as loading_app

litellm.custom_provider_map = [{"provider": "tinygrad", "custom_handler": provider}]
QUESTION = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]


def call(api_base: str, messages=QUESTION, stream: bool = False, timeout: float = 60, **kw):  # type: ignore[no-untyped-def]
    from litellm.utils import custom_llm_setup

    custom_llm_setup()

    async def go():  # type: ignore[no-untyped-def]
        result = await litellm.acompletion(model="tinygrad/smollm2", api_base=api_base, messages=messages, stream=stream,
                                           timeout=timeout, **kw)
        if stream:
            return [c async for c in result]
        return result

    return asyncio.run(go())


@pytest.fixture
def loading_backend(tmp_path: Path) -> Iterator[str]:
    """The real backend app whose model never finishes loading."""
    with loading_app(tmp_path) as url:
        yield url


def test_answer_usage_and_timings(bundled_backend: str) -> None:
    r = call(bundled_backend, temperature=0, max_tokens=8)
    assert "Paris" in r.choices[0].message.content
    assert r.usage.prompt_tokens == 42 and 1 <= r.usage.completion_tokens <= 8
    timings = r._hidden_params["timings"]
    assert timings["device"] == "CPU" and timings["ttft_ms"] > 0 and timings["predicted_n"] == r.usage.completion_tokens


def test_stream_carries_usage_and_timings(bundled_backend: str) -> None:
    chunks = call(bundled_backend, stream=True, temperature=0, max_tokens=3, stream_options={"include_usage": True})
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text.startswith("The")
    usage = [c.usage for c in chunks if getattr(c, "usage", None)]
    assert usage and usage[-1].completion_tokens == 3
    assert any(getattr(c, "timings", None) for c in chunks)


def test_prompt_too_long_is_context_window_exceeded(bundled_backend: str) -> None:
    with pytest.raises(litellm.ContextWindowExceededError):
        call(bundled_backend, messages=[{"role": "user", "content": "word " * 600}], max_tokens=1)
    with pytest.raises(litellm.ContextWindowExceededError):
        call(bundled_backend, messages=[{"role": "user", "content": "word " * 600}], max_tokens=1, stream=True)


def test_stopped_backend_is_service_unavailable() -> None:
    url = f"http://127.0.0.1:{refused_port()}"
    with pytest.raises(litellm.ServiceUnavailableError, match="unreachable"):
        call(url)
    with pytest.raises(litellm.ServiceUnavailableError):
        call(url, stream=True)


def test_loading_backend_is_service_unavailable(loading_backend: str) -> None:
    import httpx

    assert httpx.get(loading_backend + "/health").json()["status"] == "loading"
    with pytest.raises(litellm.ServiceUnavailableError, match="loading"):
        call(loading_backend)
    with pytest.raises(litellm.ServiceUnavailableError):
        call(loading_backend, stream=True)


def test_silent_backend_is_timeout() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(8)  # accepts connections, never answers
        url = f"http://127.0.0.1:{s.getsockname()[1]}"
        with pytest.raises(litellm.Timeout):
            call(url, timeout=1)
