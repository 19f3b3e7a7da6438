"""The whole path with real parts, in tinygrad's smoke-test style: ask the bundled model a question.

The shipped config.yaml's `quick` chain (llama3.2:3b on Ollama, then the tinygrad backend) runs
unchanged, except that Ollama's address is a port where nothing listens (so a machine that does run
Ollama gives the same answer) and the backend is the session's shared one (conftest.real_proxy).
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai

from tests.conftest import shipped_config
from tests.servers import ROOT, free_port, wait_http
from tests.tinygrad_backend.tiny_gguf import write_tiny


def test_quick_answers_paris_through_proxy_and_backend(real_proxy: str) -> None:
    c = openai.OpenAI(base_url=real_proxy + "/v1", api_key="sk-local", max_retries=0)
    raw = c.chat.completions.with_raw_response.create(
        model="quick", temperature=0, max_tokens=10,
        messages=[{"role": "user", "content": "What is the capital of France? Answer in one word."}])
    answer = raw.parse()
    assert "Paris" in (answer.choices[0].message.content or "")
    assert raw.headers["x-delegate-served-by"] == "tinygrad/smollm2"
    assert raw.headers["x-delegate-fallbacks"] == "1"  # llama3.2:3b was down


def test_delegate_serve_starts_backend_then_proxy_and_stops_both(tmp_path: Path) -> None:
    model = write_tiny(tmp_path / "smollm2.gguf", "llama", context=128)  # served as `smollm2`, as config.yaml asks
    backend_port, proxy_port = free_port(), free_port()
    config = shipped_config(tmp_path / "config.yaml", f"http://127.0.0.1:{backend_port}",
                            {"model": str(model), "port": backend_port, "max_context": 64, "parallel": 2})
    proc = subprocess.Popen([sys.executable, "-m", "proxy.client.cli", "serve", "--config", str(config), "--port",
                             str(proxy_port)],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        wait_http(f"http://127.0.0.1:{proxy_port}/health/liveliness", timeout=180, proc=proc)
        assert httpx.get(f"http://127.0.0.1:{backend_port}/health").status_code in (200, 503)  # started first
        wait_http(f"http://127.0.0.1:{proxy_port}/health/readiness", timeout=180, proc=proc)  # the backend is ready
        r = httpx.post(f"http://127.0.0.1:{proxy_port}/v1/chat/completions", timeout=60,
                       json={"model": "quick", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 2})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1
        assert httpx.get(f"http://127.0.0.1:{backend_port}/health").json()["slots"] == 2  # config's backend.parallel
    finally:
        proc.send_signal(signal.SIGINT)  # Ctrl-C
        out = proc.communicate(timeout=60)[0].decode(errors="replace")
    assert proc.returncode == 0, out
    time.sleep(0.5)
    for port in (backend_port, proxy_port):
        try:
            httpx.get(f"http://127.0.0.1:{port}/health", timeout=1)
            raise AssertionError(f"something still answers on {port}")
        except httpx.ConnectError:
            pass
