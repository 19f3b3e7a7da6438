"""How every client-side tool reaches the proxy: its address and key, the `openai` client, plain GETs, the one
message for a proxy that is not there, and the aliases it serves (read from GET /v1/models, never copied).

DELEGATE_URL (default http://127.0.0.1:4000) and DELEGATE_API_KEY (default sk-local) point it elsewhere. Each
request names the tool that sent it in the `x-delegate-source` header (api, cli, mcp, review, ...), so usage
rows can say where calls come from. What /v1/models said is kept for a few seconds per address and key: a
batch of calls asks once, and an alias added to config.yaml is seen once the proxy reloads. Safe to share
between threads. openai is imported on first use, so a tool that only reads /v1/models stays light.
"""

from __future__ import annotations

import functools
import os
import threading
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import httpx

if TYPE_CHECKING:
    import openai

DEFAULT_URL = "http://127.0.0.1:4000"
DEFAULT_KEY = "sk-local"  # any key works while the proxy has no DELEGATE_MASTER_KEY
SOURCE_HEADER = "x-delegate-source"
MODELS_TTL_S = 10.0  # how long what /v1/models said is trusted before asking again

_models: dict[tuple[str, str], tuple[float, list[dict[str, Any]]]] = {}
_models_lock = threading.Lock()


class ProxyError(Exception):
    """The proxy could not be asked, in one sentence for the user."""


class Unreachable(ProxyError):
    """Nothing answers at the proxy's address."""


def proxy_url() -> str:
    return (os.environ.get("DELEGATE_URL") or DEFAULT_URL).rstrip("/").removesuffix("/v1")


def api_key() -> str:
    return os.environ.get("DELEGATE_API_KEY") or DEFAULT_KEY


class Connection:
    """The proxy as one client tool sees it; `source` names the tool in every request's x-delegate-source."""

    def __init__(self, source: str, url: str | None = None, key: str | None = None) -> None:
        self.source = source
        self.url = (url or proxy_url()).rstrip("/").removesuffix("/v1")
        self.key = key or api_key()

    @property
    def headers(self) -> dict[str, str]:
        return {"authorization": f"Bearer {self.key}", SOURCE_HEADER: self.source}

    def unreachable_message(self) -> str:
        return f"cannot reach the Delegate proxy at {self.url}: start it with `make serve`"

    def openai(self, max_retries: int = 0) -> openai.OpenAI:
        """The `openai` client for this proxy (one per address, key, source and retry count, kept)."""
        return _openai_client(self.url, self.key, self.source, max_retries)

    def get(self, path: str, timeout: float = 10.0) -> httpx.Response:
        """GET `path`; Unreachable when nothing answers, ProxyError when the proxy wants a key it was not given."""
        try:
            r = httpx.get(self.url + path, headers=self.headers, timeout=timeout)
        except httpx.HTTPError as e:
            raise Unreachable(self.unreachable_message()) from e
        if r.status_code == 401:
            raise ProxyError("the proxy wants a key: set DELEGATE_API_KEY")
        return r

    def models(self, fresh: bool = False) -> list[dict[str, Any]]:
        """GET /v1/models's entries (id, kind alias|model, description, fallbacks, deployments, context_length)."""
        cache_key = (self.url, self.key)
        now = time.monotonic()
        with _models_lock:
            cached = _models.get(cache_key)
        if cached is not None and not fresh and now < cached[0]:
            return cached[1]
        r = self.get("/v1/models")
        if r.status_code != 200:
            raise ProxyError(f"the proxy could not list its models (HTTP {r.status_code})")
        try:
            data = [m for m in r.json().get("data", []) if isinstance(m, dict) and "id" in m]
        except (ValueError, AttributeError) as e:
            raise ProxyError(f"{self.url} did not answer /v1/models as a Delegate proxy does") from e
        with _models_lock:
            _models[cache_key] = (now + MODELS_TTL_S, data)
        return data

    def aliases(self) -> dict[str, dict[str, Any]]:
        """The task aliases the proxy serves, by name, in its order."""
        return {m["id"]: m for m in self.models() if m.get("kind") == "alias"}

    def check_alias(self, name: str) -> None:
        """ValueError naming the proxy's aliases when it serves no alias `name`; Unreachable when nothing answers.

        A proxy that cannot tell (a wrong key, a server that is not Delegate's and lists no kinds) is not second-
        guessed: the request itself will say what is wrong."""
        try:
            models = self.models()
        except Unreachable:
            raise
        except ProxyError:
            return
        if not any("kind" in m for m in models):
            return
        aliases = [m["id"] for m in models if m.get("kind") == "alias"]
        if name not in aliases:
            raise ValueError(unknown_alias(name, aliases))


def unknown_alias(name: str, aliases: Iterable[str]) -> str:
    """The sentence for an alias the proxy does not serve."""
    return f"unknown task {name!r}; the proxy's aliases are {', '.join(aliases) or '(none)'}"


@functools.lru_cache(maxsize=16)
def _openai_client(url: str, key: str, source: str, max_retries: int) -> openai.OpenAI:
    import openai

    # retries are the caller's and the proxy's; the SDK's own would hide failures
    return openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=max_retries,
                         default_headers={SOURCE_HEADER: source})
