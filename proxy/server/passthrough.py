"""The relay to Anthropic: a Claude model no tier maps, or a tier whose local chain could not answer.

The body goes as the client sent it, byte for byte, with its `anthropic-*` headers (`anthropic-version`,
`anthropic-beta`), to `delegate.anthropic.base_url` (default https://api.anthropic.com). The answer comes back
as Anthropic sent it: the status, its headers that matter, and a stream's bytes relayed as they arrive. Beside
the relay, the usage Anthropic reports (input, output, cache creation, cache read) is read off the answer for
the request's row, priced from LiteLLM's table.

Whose key: the caller's own `x-api-key` when it is an Anthropic key (`sk-ant-...`) and not the Delegate key the
caller signed in with; otherwise `delegate.anthropic.api_key` (e.g. `os.environ/ANTHROPIC_API_KEY`). A Delegate
key never leaves this machine. With neither, the request is refused with an authentication_error naming both
ways, before anything is sent.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx

from proxy.server.errors import ProxyError
from proxy.settings import AnthropicSettings
from proxy.usage.trace import CloudUsage, RequestTrace

_LIMITS = httpx.Limits(max_connections=64, max_keepalive_connections=16)
# the client's headers that go with the body: Anthropic's own, and what says what the body is
FORWARDED_HEADERS = ("content-type", "accept", "user-agent")
# Anthropic's answer headers that go back to the client
RETURNED_HEADERS = ("content-type", "request-id", "retry-after", "x-should-retry")
RETURNED_PREFIXES = ("anthropic-",)


class NoKey(ProxyError):
    def __init__(self, model: str) -> None:
        super().__init__(401, f"'{model}' is served by Anthropic and no Anthropic key is available: send yours in "
                              "'x-api-key' (with your Delegate key, if the proxy needs one, in 'Authorization: Bearer'), "
                              "or set delegate.anthropic.api_key in config.yaml (e.g. os.environ/ANTHROPIC_API_KEY)",
                         type_="authentication_error", code="no_anthropic_key")


@dataclass(frozen=True)
class OwnKey:
    """The caller's own Anthropic key, and the header it came in: it goes on the same way."""

    header: str  # x-api-key | authorization
    key: str


@dataclass(frozen=True)
class Upstream:
    """One request's way to Anthropic: the key to send and the client headers that go along."""

    key: str
    headers: dict[str, str]


def forwarded_headers(headers: Any, key: OwnKey) -> dict[str, str]:
    out = {k: v for k, v in headers.items() if k.lower().startswith("anthropic-") or k.lower() in FORWARDED_HEADERS}
    if key.header == "authorization":
        out["authorization"] = f"Bearer {key.key}"
    else:
        out["x-api-key"] = key.key
    out["accept-encoding"] = "identity"  # the bytes are relayed as they come: none to decompress on the way
    return out


def returned_headers(headers: httpx.Headers) -> dict[str, str]:
    return {k: v for k, v in headers.items()
            if k.lower() in RETURNED_HEADERS or k.lower().startswith(RETURNED_PREFIXES)}


def read_usage(usage: dict[str, Any] | None, into: CloudUsage) -> None:
    """Anthropic's usage fields, as far as this event or answer carries them (a later event's counts win)."""
    if not isinstance(usage, dict):
        return
    for field, attr in (("input_tokens", "input_tokens"), ("output_tokens", "output_tokens"),
                        ("cache_creation_input_tokens", "cache_creation_tokens"),
                        ("cache_read_input_tokens", "cache_read_tokens")):
        value = usage.get(field)
        if isinstance(value, int) and value >= 0:
            setattr(into, attr, value)


class UsageTap:
    """Reads the usage out of an Anthropic event stream as it passes, without holding the stream back."""

    def __init__(self, usage: CloudUsage) -> None:
        self.usage, self.buffer, self.events, self.text_events = usage, b"", 0, 0
        self.error: str | None = None
        self.stopped = False

    def feed(self, chunk: bytes) -> None:
        self.buffer += chunk
        while b"\n" in self.buffer:
            line, self.buffer = self.buffer.split(b"\n", 1)
            if line.startswith(b"data:"):
                self._event(line[5:].strip())

    def _event(self, data: bytes) -> None:
        try:
            event = json.loads(data)
        except ValueError:
            return
        if not isinstance(event, dict):
            return
        kind = event.get("type")
        if kind == "message_start":
            message = event.get("message") or {}
            read_usage(message.get("usage"), self.usage)
        elif kind == "message_delta":
            read_usage(event.get("usage"), self.usage)
        elif kind == "content_block_delta":
            self.text_events += 1
        elif kind == "message_stop":
            self.stopped = True
        elif kind == "error":
            self.error = str((event.get("error") or {}).get("message") or "error event")[:500]


class Passthrough:
    def __init__(self, settings: AnthropicSettings) -> None:
        self.base_url = settings.base_url.rstrip("/")
        self.configured_key = settings.api_key
        self.timeout = httpx.Timeout(settings.timeout_s, connect=10.0)
        self._client: httpx.AsyncClient | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def client(self) -> httpx.AsyncClient:
        loop = asyncio.get_running_loop()  # a pooled client belongs to the loop that opened its connections
        if self._client is None or self._client.is_closed or self._loop is not loop:
            self._client, self._loop = httpx.AsyncClient(limits=_LIMITS, timeout=self.timeout), loop
        return self._client

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()

    def available(self, own_key: OwnKey | None) -> bool:
        return bool(own_key or self.configured_key)

    def upstream(self, headers: Any, own_key: OwnKey | None, model: str) -> Upstream:
        """`own_key`: the caller's own Anthropic key, if it sent one; else the configured key, as x-api-key."""
        key = own_key or (OwnKey("x-api-key", self.configured_key) if self.configured_key else None)
        if key is None:
            raise NoKey(model)
        return Upstream(key.key, forwarded_headers(headers, key))

    async def send(self, path: str, body: bytes, upstream: Upstream) -> httpx.Response:
        """Open the request to Anthropic; the caller reads (or streams) the answer and closes it."""
        client = self.client()
        request = client.build_request("POST", self.base_url + path, content=body, headers=upstream.headers)
        try:
            return await client.send(request, stream=True)
        except httpx.TimeoutException as e:
            raise ProxyError(504, f"Anthropic ({self.base_url}) did not answer in time", type_="timeout_error",
                             code="upstream_timeout") from e
        except httpx.HTTPError as e:
            raise ProxyError(502, f"cannot reach Anthropic at {self.base_url}: {type(e).__name__}", type_="api_error",
                             code="upstream_unreachable", retry_after=5) from e


async def relay(response: httpx.Response, tap: UsageTap, trace: RequestTrace) -> AsyncIterator[bytes]:
    """A stream's bytes to the client as they come from Anthropic, the usage read on the way."""
    try:
        async for chunk in response.aiter_raw():
            if trace.first_token_at is None:
                trace.first_token_at = time.perf_counter()
            tap.feed(chunk)
            yield chunk
    finally:
        with contextlib.suppress(Exception):
            await response.aclose()
