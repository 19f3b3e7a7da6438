"""A tinygrad backend that says it is unhealthy leaves rotation at once, and the key a backend asks for is sent.

The backends are FakeBackend servers speaking the tinygrad backend's HTTP API (its /health included):
a stuck engine cannot be made on demand in the real one (tests/tinygrad_backend/test_engine_faults.py
covers how the real engine reports it).
"""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import openai

from tests.conftest import write_config

MSG = [{"role": "user", "content": "hi"}]


def test_an_unhealthy_backend_is_cooled_down_and_its_chain_falls_back(tmp_path: Path, fake_backend, start_proxy) -> None:  # type: ignore[no-untyped-def]
    stuck, stuck_url = fake_backend("stuck", mode="stall")  # a stuck engine: /health says so, requests never end
    stuck.health = "unhealthy"
    _, ok_url = fake_backend("ok")
    config = write_config(tmp_path / "c.yaml", [("heavy", "tinygrad/stuck", stuck_url.removesuffix("/v1")),
                                                ("smollm2", "tinygrad/ok", ok_url.removesuffix("/v1"))],
                          fallbacks={"heavy": ["smollm2"]}, aliases=["heavy"])
    proxy = start_proxy(config)
    client = openai.OpenAI(base_url=proxy.url + "/v1", api_key="unused", max_retries=0, timeout=20)
    started = time.monotonic()
    raw = client.chat.completions.with_raw_response.create(model="heavy", messages=MSG)
    assert raw.headers["x-delegate-served-by"] == "tinygrad/ok"
    assert raw.parse().choices[0].message.content == "answer from ok"
    assert not stuck.requests  # never tried: it was out of rotation
    assert time.monotonic() - started < 10  # well inside the stall (an hour) and the 30 s deployment timeout
    report = httpx.get(proxy.url + "/health").json()["deployments"]
    head = next(d for d in report if d["model"] == "tinygrad/stuck")
    assert head["status"] == "unhealthy" and "no progress" in head["detail"] and head["cooldown_remaining_s"] > 0


def test_the_backend_key_is_sent(tmp_path: Path, fake_backend, start_proxy) -> None:  # type: ignore[no-untyped-def]
    backend, url = fake_backend("tg")
    config = write_config(tmp_path / "c.yaml", [("quick", "tinygrad/tg", url.removesuffix("/v1"),
                                                 {"api_key": "sk-backend"})])
    proxy = start_proxy(config)
    client = openai.OpenAI(base_url=proxy.url + "/v1", api_key="unused", max_retries=0)
    client.chat.completions.create(model="quick", messages=MSG)
    with client.chat.completions.create(model="quick", messages=MSG, stream=True) as stream:
        assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == "answer from tg"
    assert [h.get("authorization") for h in backend.headers] == ["Bearer sk-backend"] * 2
