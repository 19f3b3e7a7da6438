"""The backend's copy of the header timeout (slowloris): the same code as the proxy's, wired into `_serve`."""

from __future__ import annotations

import re
import socket
import time
from pathlib import Path

import uvicorn
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from tests.servers import ROOT, ServerThread
from tinygrad_backend import header_timeout


def _without_docstring(path: Path) -> str:
    return re.sub(r'^""".*?"""\n', "", path.read_text(), count=1, flags=re.S)


def test_the_backend_copy_is_the_proxys_code() -> None:
    ours, proxys = ROOT / "tinygrad_backend/header_timeout.py", ROOT / "proxy/server/header_timeout.py"
    assert _without_docstring(ours) == _without_docstring(proxys)


def test_serve_runs_uvicorn_with_the_header_timeout() -> None:
    source = (ROOT / "tinygrad_backend/cli.py").read_text()
    spec = re.search(r'http="([\w.:]+)"', source)
    assert spec is not None, "tinygrad_backend/cli.py's uvicorn.Config names no http protocol"
    assert uvicorn.importer.import_from_string(spec.group(1)) is header_timeout.HeaderTimeoutProtocol
    assert header_timeout.HeaderTimeoutProtocol.header_timeout_s == 10.0


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
