"""Slowloris: a connection whose request headers never finish is closed after delegate.header_timeout_s.

The proxy runs under the uvicorn.Config that `delegate serve` builds (proxy.server.serve.server_config), on a
real socket; a raw client sends half a request, or nothing, and waits for the server to hang up.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import uvicorn

from proxy import settings as settings_module
from proxy.server.app import create_app
from proxy.server.serve import server_config
from proxy.usage.store import UsageStore
from serving.listen import bind
from tests.conftest import write_config
from tests.servers import free_port

TIMEOUT = 0.5


@contextlib.contextmanager
def served(tmp_path: Path, header_timeout_s: float) -> Iterator[int]:
    config = write_config(tmp_path / "c.yaml", [("coding", "openai/x", "http://127.0.0.1:9/v1")],
                          delegate={"header_timeout_s": header_timeout_s})
    settings = settings_module.load(config)
    app = create_app(settings, None, UsageStore.open(f"sqlite:///{tmp_path / 'usage.db'}"))
    port = free_port()
    sock = bind("127.0.0.1", port, backlog=2048)
    server = uvicorn.Server(server_config(app, settings))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the proxy did not start"
        time.sleep(0.01)
    try:
        yield port
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()


def seconds_until_closed(conn: socket.socket, limit: float = 10.0) -> float:
    """Read until the server hangs up; the seconds that took (`limit` if it never did)."""
    start = time.monotonic()
    conn.settimeout(limit)
    try:
        while conn.recv(4096):
            pass
    except TimeoutError:
        return limit
    except ConnectionResetError:
        pass
    return time.monotonic() - start


def get(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=5)


REQUEST = b"GET /health/liveliness HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"


def test_half_a_request_is_closed_after_the_header_timeout(tmp_path: Path) -> None:
    with served(tmp_path, TIMEOUT) as port, get(port) as conn:
        conn.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Le")
        took = seconds_until_closed(conn)
        assert TIMEOUT * 0.8 <= took < TIMEOUT + 2, took


def test_a_connection_that_never_sends_a_byte_is_closed(tmp_path: Path) -> None:
    with served(tmp_path, TIMEOUT) as port, get(port) as conn:
        took = seconds_until_closed(conn)
        assert took < TIMEOUT + 2, took


def test_headers_trickling_in_within_the_timeout_are_answered(tmp_path: Path) -> None:
    with served(tmp_path, 2.0) as port, get(port) as conn:
        for piece in (REQUEST[:10], REQUEST[10:30], REQUEST[30:]):
            conn.sendall(piece)
            time.sleep(0.3)
        assert conn.recv(4096).startswith(b"HTTP/1.1 200")


def test_a_kept_alive_connection_is_timed_per_request_not_per_connection(tmp_path: Path) -> None:
    with served(tmp_path, TIMEOUT) as port, get(port) as conn:
        conn.sendall(REQUEST)
        assert conn.recv(4096).startswith(b"HTTP/1.1 200")
        time.sleep(TIMEOUT * 2)  # idle between requests: uvicorn's keep-alive (5 s) applies, not the header timeout
        conn.sendall(REQUEST)
        assert conn.recv(4096).startswith(b"HTTP/1.1 200")
        conn.sendall(REQUEST[:20])  # the next request stalls half-way: closed after the header timeout
        took = seconds_until_closed(conn)
        assert took < TIMEOUT + 2, took
