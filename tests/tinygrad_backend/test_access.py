"""Who may reach the backend: its API key, loopback Host headers, the body limit, and the refusal to bind
beyond loopback without a key.

The real backend app (routes, errors, access control) serves with its model held in `loading`: every
check here happens before a request reaches the engine, so no model has to load.
"""

from __future__ import annotations

import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import ollama
import openai
import pytest

from tests.servers import ROOT, free_port
from tests.tinygrad_backend.loading_backend import loading_backend
from tinygrad_backend.access import host_name, is_loopback_host

KEY = "sk-backend-test"
CHAT = {"model": "smollm2", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}


@pytest.fixture
def backend(tmp_path: Path) -> Iterator[str]:
    with loading_backend(tmp_path, api_key=KEY, loopback_only_hosts=True, max_body_bytes=4096) as url:
        yield url


def test_the_key_is_required_except_for_health(backend: str) -> None:
    assert httpx.get(backend + "/health").json()["status"] == "loading"
    r = httpx.post(backend + "/v1/chat/completions", json=CHAT)
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    r = httpx.post(backend + "/v1/chat/completions", json=CHAT, headers={"Authorization": "Bearer wrong"})
    assert r.status_code == 401
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=backend + "/v1", api_key="wrong", max_retries=0).models.list()
    assert openai.OpenAI(base_url=backend + "/v1", api_key=KEY, max_retries=0).models.list().data[0].id == "smollm2"
    # past the key, the request reaches the routes: the model is still loading
    r = httpx.post(backend + "/v1/chat/completions", json=CHAT, headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 503 and r.json()["error"]["code"] == "model_loading"


def test_ollama_clients_get_ollama_shaped_errors_and_pass_with_the_key(backend: str) -> None:
    r = httpx.post(backend + "/api/chat", json={"model": "smollm2", "messages": CHAT["messages"]})
    assert r.status_code == 401 and isinstance(r.json()["error"], str)
    client = ollama.Client(host=backend, headers={"Authorization": f"Bearer {KEY}"})
    assert client.list().models[0].model == "smollm2:latest"


def test_only_loopback_hosts(backend: str) -> None:
    auth = {"Authorization": f"Bearer {KEY}"}
    for host in ("evil.example", "evil.example:8001", "192.168.1.5", "127.0.0.1.evil.example"):
        r = httpx.get(backend + "/v1/models", headers={**auth, "Host": host})
        assert r.status_code == 403 and r.json()["error"]["code"] == "host_not_allowed", host
    for host in ("localhost", "localhost:8001", "127.0.0.1:1", "[::1]:8001"):
        assert httpx.get(backend + "/v1/models", headers={**auth, "Host": host}).status_code == 200, host


def test_bodies_over_the_limit_are_413(backend: str) -> None:
    auth = {"Authorization": f"Bearer {KEY}"}
    big = {**CHAT, "messages": [{"role": "user", "content": "x" * 5000}]}
    r = httpx.post(backend + "/v1/chat/completions", json=big, headers=auth)
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"

    def chunks() -> Iterator[bytes]:  # no Content-Length: counted as it arrives
        yield b'{"model": "smollm2", "messages": [{"role": "user", "content": "'
        for _ in range(10):
            yield b"x" * 1000
        yield b'"}]}'

    r = httpx.post(backend + "/api/chat", content=chunks(), headers=auth)
    assert r.status_code == 413 and "limit" in r.json()["error"]


@pytest.mark.parametrize(("host", "name"), [("localhost:80", "localhost"), ("[::1]:8001", "[::1]"), ("::1", "::1"),
                                            ("127.0.0.2", "127.0.0.2")])
def test_host_names(host: str, name: str) -> None:
    assert host_name(host) == name and is_loopback_host(host)


def test_binding_beyond_loopback_needs_a_key() -> None:
    env = {k: v for k, v in __import__("os").environ.items() if k != "DELEGATE_BACKEND_API_KEY"}
    r = subprocess.run([sys.executable, "-m", "tinygrad_backend", "--host", "0.0.0.0", "--port", str(free_port())],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    assert "without an API key" in r.stderr and "Traceback" not in r.stderr
    with socket.socket() as s:  # and it did not bind
        s.bind(("0.0.0.0", 0))
