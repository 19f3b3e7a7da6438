"""serving/: what the proxy and the backend share, checked once here; each side's tests check that it uses it."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time

import pytest
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from serving import header_timeout
from serving.json_body import without_lone_surrogates
from serving.listen import ListenError, bind, is_loopback
from tests.servers import ROOT, ServerThread


def test_it_imports_neither_side() -> None:
    """Both sides import it at start-up: it must bring neither the other side nor LiteLLM or tinygrad along."""
    code = ("import json, sys, serving.header_timeout, serving.listen, serving.json_body\n"
            "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in "
            "('proxy', 'tinygrad_backend', 'litellm', 'tinygrad'))))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == []


def test_half_a_request_is_closed() -> None:
    async def ok(request):  # type: ignore[no-untyped-def]
        return PlainTextResponse("ok")

    app = Starlette(routes=[Route("/health", ok)])
    with ServerThread(app, http=header_timeout.with_header_timeout(0.5)) as server:
        port = server.port
        with socket.create_connection(("127.0.0.1", port), timeout=5) as conn:
            conn.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            assert conn.recv(4096).startswith(b"HTTP/1.1 200")
        with socket.create_connection(("127.0.0.1", port), timeout=5) as conn:
            conn.sendall(b"GET /health HTTP/1.1\r\nHo")
            start = time.monotonic()
            conn.settimeout(10)
            while conn.recv(4096):
                pass
            assert time.monotonic() - start < 2.5


def test_a_taken_port_is_one_sentence_naming_it() -> None:
    with bind("127.0.0.1", 0, backlog=8) as taken:
        port = taken.getsockname()[1]
        with pytest.raises(ListenError, match=f"^cannot listen on 127.0.0.1:{port}: "):
            bind("127.0.0.1", port, backlog=8)


@pytest.mark.parametrize(("host", "loopback"), [("localhost", True), ("127.0.0.2", True), ("::1", True),
                                                ("0.0.0.0", False), ("::", False), ("example.com", False)])
def test_is_loopback(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback


def test_lone_surrogates_become_the_replacement_character_in_keys_and_values() -> None:
    body = json.loads('{"a\\ud800": ["x\\udfffy", {"k": "\\ud83d"}], "n": 1}')
    assert without_lone_surrogates(body) == {"a\ufffd": ["x\ufffdy", {"k": "\ufffd"}], "n": 1}
    assert without_lone_surrogates("😀") == "😀"
