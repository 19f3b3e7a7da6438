"""The one way client tools reach the proxy (proxy/client/connection.py): address and key, the source header on
every request, the aliases read from /v1/models and kept briefly, and the one message for a proxy that is not there."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from proxy.client import connection
from proxy.client.connection import Connection, ProxyError, Unreachable
from tests.conftest import write_config
from tests.servers import ServerThread, refused_port

MODELS = [{"id": "coding", "kind": "alias"}, {"id": "newalias", "kind": "alias"}, {"id": "smollm2", "kind": "model"}]


class Recorder:
    """A stand-in proxy that counts /v1/models and keeps every request's headers."""

    def __init__(self) -> None:
        self.models_asked = 0
        self.headers: list[dict[str, str]] = []
        self.app = Starlette(routes=[Route("/v1/models", self.models, methods=["GET"]),
                                     Route("/v1/chat/completions", self.chat, methods=["POST"])])

    async def models(self, request: Request) -> Response:
        self.models_asked += 1
        self.headers.append(dict(request.headers))
        return JSONResponse({"object": "list", "data": MODELS})

    async def chat(self, request: Request) -> Response:
        self.headers.append(dict(request.headers))
        body = await request.json()
        return JSONResponse({"id": "c1", "object": "chat.completion", "created": 0, "model": body["model"],
                             "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"},
                                          "finish_reason": "stop"}],
                             "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}})


@pytest.fixture
def recorder() -> Iterator[tuple[Recorder, str]]:
    rec = Recorder()
    with ServerThread(rec.app) as server:
        yield rec, server.url


def test_address_and_key_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DELEGATE_URL", "http://10.0.0.5:4000/v1/")
    monkeypatch.setenv("DELEGATE_API_KEY", "sk-dlg-x")
    conn = Connection("cli")
    assert (conn.url, conn.key) == ("http://10.0.0.5:4000", "sk-dlg-x")
    assert conn.headers == {"authorization": "Bearer sk-dlg-x", "x-delegate-source": "cli"}
    monkeypatch.delenv("DELEGATE_URL")
    monkeypatch.delenv("DELEGATE_API_KEY")
    assert (Connection("api").url, Connection("api").key) == ("http://127.0.0.1:4000", "sk-local")


def test_every_request_names_its_source(recorder: tuple[Recorder, str]) -> None:
    rec, url = recorder
    conn = Connection("review", url=url, key="k1")
    conn.models(fresh=True)
    conn.openai().chat.completions.create(model="coding", messages=[{"role": "user", "content": "hi"}])
    assert [h["x-delegate-source"] for h in rec.headers] == ["review", "review"]
    assert all(h["authorization"] == "Bearer k1" for h in rec.headers)


def test_aliases_are_read_from_the_proxy_and_kept_briefly(recorder: tuple[Recorder, str],
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    rec, url = recorder
    assert list(Connection("api", url=url, key="a").aliases()) == ["coding", "newalias"]
    assert list(Connection("cli", url=url, key="a").aliases()) == ["coding", "newalias"]
    assert rec.models_asked == 1  # one address and key: asked once
    Connection("api", url=url, key="b").aliases()
    assert rec.models_asked == 2  # another key may see another proxy's answer
    monkeypatch.setattr(connection, "MODELS_TTL_S", 0.0)
    Connection("api", url=url, key="c").aliases()
    Connection("api", url=url, key="c").aliases()
    assert rec.models_asked == 4  # expired at once: asked each time


def test_check_alias(recorder: tuple[Recorder, str]) -> None:
    _, url = recorder
    conn = Connection("api", url=url, key="check")
    conn.check_alias("newalias")  # an alias config.yaml gained, no copy to update
    with pytest.raises(ValueError, match="unknown task 'poetry'; the proxy's aliases are coding, newalias"):
        conn.check_alias("poetry")
    with pytest.raises(ValueError):
        conn.check_alias("smollm2")  # a model, not a task alias


def test_check_alias_leaves_what_the_proxy_cannot_tell_to_the_request(tmp_path: Path, fake_backend,  # type: ignore[no-untyped-def]
                                                                       start_proxy) -> None:
    backend, url = fake_backend("plain")
    Connection("api", url=url.removesuffix("/v1")).check_alias("anything")  # no `kind`: not a Delegate proxy
    proxy = start_proxy(write_config(tmp_path / "c.yaml", [("coding", "openai/plain", url)]), master_key="sk-master")
    Connection("api", url=proxy.url, key="wrong").check_alias("poetry")  # 401: the request will say so
    with pytest.raises(ProxyError, match="set DELEGATE_API_KEY"):
        Connection("api", url=proxy.url, key="wrong").get("/v1/models")


def test_unreachable_is_one_sentence() -> None:
    url = f"http://127.0.0.1:{refused_port()}"
    conn = Connection("api", url=url)
    assert conn.unreachable_message() == f"cannot reach the Delegate proxy at {url}: start it with `make serve`"
    with pytest.raises(Unreachable, match="cannot reach the Delegate proxy"):
        conn.models()
    with pytest.raises(Unreachable):
        conn.check_alias("coding")
