"""Sampling parameters are range-checked at the proxy, before any backend sees them (the backend checks
them again: tests/tinygrad_backend/test_hostile_requests.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import write_config

MSG = [{"role": "user", "content": "hi"}]


@pytest.fixture
def proxy_url(tmp_path: Path, fake_backend, start_proxy) -> str:  # type: ignore[no-untyped-def]
    _, url = fake_backend("ok")
    return str(start_proxy(write_config(tmp_path / "c.yaml", [("quick", "openai/ok", url)])).url)


@pytest.mark.parametrize(("field", "value"), [
    ("seed", -1), ("seed", 2**63), ("seed", 1.5), ("top_p", 0), ("top_p", 1.01), ("temperature", -0.1),
    ("temperature", 2.5), ("top_logprobs", 21), ("top_logprobs", -1), ("logprobs", "yes"),
    ("logit_bias", {"abc": 1}), ("logit_bias", {"5": 101}), ("logit_bias", [1]),
])
def test_out_of_range_is_400_naming_the_field(proxy_url: str, field: str, value: Any) -> None:
    r = httpx.post(proxy_url + "/v1/chat/completions", json={"model": "quick", "messages": MSG, field: value})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == field


@pytest.mark.parametrize(("field", "value"), [("seed", 0), ("seed", 2**63 - 1), ("top_p", 1), ("temperature", 5e-324),
                                              ("top_logprobs", 20), ("logit_bias", {"5": -100})])
def test_the_edges_are_accepted(proxy_url: str, field: str, value: Any) -> None:
    r = httpx.post(proxy_url + "/v1/chat/completions", json={"model": "quick", "messages": MSG, field: value})
    assert r.status_code == 200, r.text


@pytest.mark.parametrize(("path", "body", "param"), [
    ("/v1/chat/completions", {"messages": [{"role": "assistant", "content": "x", "tool_calls": -17}], "model": "quick"},
     "messages[0].tool_calls"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x", "tool_calls": []}], "model": "quick"},
     "messages[0].tool_calls"),
    ("/v1/chat/completions", {"messages": [{"role": "assistant", "content": None, "tool_calls": [{"function": {"name": 1}}]}],
                              "model": "quick"}, "messages[0].tool_calls"),
    ("/v1/completions", {"prompt": "x", "tools": 5.2, "model": "quick"}, "tools"),
])
def test_tool_fields_of_the_wrong_shape_are_400(proxy_url: str, path: str, body: dict[str, Any], param: str) -> None:
    """Found by bench-reliability's hostile bodies: these reached LiteLLM and came back as a 503."""
    r = httpx.post(proxy_url + path, json=body)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param
