"""uvicorn's httptools protocol with a header timeout: a connection whose request headers are not complete
within `header_timeout_s` of its first byte (or of connecting) is closed, so slowloris clients cannot hold
connections open indefinitely.

uvicorn 0.54 has no such timeout: `timeout_keep_alive` only runs between requests, and it is cancelled by
the first byte of the next one, so a client that sends half a request line and then nothing keeps its
connection (and its file descriptor) for as long as it likes. Only the headers are timed here, not a body
that trickles in after them, nor the response. The proxy (`delegate serve`, with delegate.header_timeout_s) and
the backend (10 s) both run under it.
"""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

HEADER_TIMEOUT_S = 10.0


class HeaderTimeoutProtocol(HttpToolsProtocol):
    header_timeout_s = HEADER_TIMEOUT_S
    _header_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_header_timer()  # a connection that never sends a byte is closed too

    def on_message_begin(self) -> None:
        super().on_message_begin()
        if self._header_timer is None:  # the next request on a kept-alive connection: its clock starts now
            self._arm_header_timer()

    def on_headers_complete(self) -> None:
        self._disarm_header_timer()
        super().on_headers_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_header_timer()
        super().connection_lost(exc)

    def _arm_header_timer(self) -> None:
        self._header_timer = self.loop.call_later(self.header_timeout_s, self._header_timeout)

    def _disarm_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _header_timeout(self) -> None:
        self._header_timer = None
        if self.transport.is_closing():
            return
        if self.cycle is not None and not self.cycle.response_complete:
            # a pipelined request arriving while the previous answer still streams: that answer's
            # connection is busy, not idle; wait for it to finish before timing the next headers
            self._arm_header_timer()
            return
        self.transport.close()


def with_header_timeout(seconds: float) -> type[HeaderTimeoutProtocol]:
    """The protocol class to pass as uvicorn.Config(http=...), closing after `seconds` without headers."""
    attrs: dict[str, Any] = {"header_timeout_s": float(seconds)}
    return type("HeaderTimeoutProtocol", (HeaderTimeoutProtocol,), attrs)
