"""Who may read what, through the real proxy under uvicorn with real clients.

Admin endpoints (spend logs, the global report, the savings page's data) take the master key only; without one
they answer loopback clients only and never an issued key. An open proxy (no key at all) answers only requests
a web page cannot forge: Host naming this machine (no DNS rebinding), JSON bodies only (no cross-site
text/plain or form POST). /health hides where the backends live from issued keys.
"""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest

from proxy import settings as settings_module
from proxy.server.app import create_app
from proxy.usage.keys import KeyStore
from proxy.usage.store import UsageStore
from tests.conftest import write_config
from tests.proxy.test_report import row
from tests.servers import ServerThread

MSG = [{"role": "user", "content": "hello"}]
MASTER = "sk-master-access-0123456789"
ADMIN = ["/spend/logs", "/global/spend/report", "/ui/data"]


@pytest.fixture
def config(tmp_path: Path, fake_backend) -> Path:  # type: ignore[no-untyped-def]
    _, url = fake_backend("ok")
    return write_config(tmp_path / "c.yaml", [("coding", "openai/ok", url), ("quick", "openai/ok", url)],
                        aliases=["coding", "quick"])


def bearer(key: str | None) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"} if key else {}


def chat(url: str, key: str | None = None, **kw) -> httpx.Response:  # type: ignore[no-untyped-def]
    headers = {**bearer(key), **kw.pop("headers", {})}
    if "content" not in kw:
        kw["json"] = {"model": "quick", "messages": MSG, "max_tokens": 50}
    return httpx.post(url + "/v1/chat/completions", headers=headers, timeout=kw.pop("timeout", 30), **kw)


def error(r: httpx.Response, status: int, code: str | None = None) -> str:
    assert r.status_code == status, r.text
    body = r.json()["error"]
    assert set(body) == {"message", "type", "param", "code"}
    if code is not None:
        assert body["code"] == code, body
    return str(body["message"])


# --- 1. admin endpoints -------------------------------------------------------------------------------

def test_without_a_master_key_an_issued_key_reads_no_one_elses_spend(config: Path, start_proxy) -> None:  # type: ignore[no-untyped-def]
    UsageStore.open().insert([row(0, key_id="key_someone_else", created_at=time.time() - 60)])
    cheap, _ = KeyStore(UsageStore.open()).create(name="cheap", aliases=["quick"], budget_usd=0.01)
    proxy = start_proxy(config)
    assert chat(proxy.url, cheap).status_code == 200  # the key works for what it is for
    for path in ADMIN:
        message = error(httpx.get(proxy.url + path, headers=bearer(cheap)), 403, "forbidden")
        assert "master key" in message
    # this machine's own user, with no key, still reads them: there is no master key to ask for
    logs = httpx.get(proxy.url + "/spend/logs")
    assert logs.status_code == 200 and "key_someone_else" in [r["api_key"] for r in logs.json()]
    for path in ADMIN:
        assert httpx.get(proxy.url + path).status_code == 200, path


def test_with_a_master_key_only_the_master_key_reads_spend(config: Path, start_proxy) -> None:  # type: ignore[no-untyped-def]
    key, _ = KeyStore(UsageStore.open()).create()
    proxy = start_proxy(config, master_key=MASTER)
    for path in ADMIN:
        error(httpx.get(proxy.url + path, headers=bearer(key)), 403, "forbidden")
        error(httpx.get(proxy.url + path), 401)
        error(httpx.get(proxy.url + path, headers=bearer("sk-guess")), 401)
        assert httpx.get(proxy.url + path, headers=bearer(MASTER)).status_code == 200, path


def test_without_a_master_key_admin_endpoints_are_loopback_only(config: Path, tmp_path: Path) -> None:
    """The proxy listening on every interface, asked from this machine's own non-loopback address."""
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        probe.connect(("192.0.2.1", 9))  # no packet is sent: this only picks the outgoing interface
        address = probe.getsockname()[0]
    except OSError:
        address = None
    finally:
        probe.close()
    if not address or address.startswith("127."):
        pytest.skip("this machine has no non-loopback IPv4 address to ask from")
    app = create_app(settings_module.load(config), None, UsageStore.open(f"sqlite:///{tmp_path / 'u.db'}"))
    with ServerThread(app, host="0.0.0.0") as server:
        for path in ADMIN:
            r = httpx.get(f"http://{address}:{server.port}{path}", headers={"host": f"127.0.0.1:{server.port}"})
            assert "loopback" in error(r, 403, "forbidden")
            assert httpx.get(f"{server.url}{path}").status_code == 200


def test_health_hides_backend_addresses_from_issued_keys(config: Path, start_proxy) -> None:  # type: ignore[no-untyped-def]
    key, _ = KeyStore(UsageStore.open()).create()
    proxy = start_proxy(config, master_key=MASTER)
    as_key = httpx.get(proxy.url + "/health", headers=bearer(key)).json()["deployments"]
    as_master = httpx.get(proxy.url + "/health", headers=bearer(MASTER)).json()["deployments"]
    assert [d["status"] for d in as_key] == [d["status"] for d in as_master]
    assert all(d["api_base"] is None for d in as_key) and all(d["api_base"] for d in as_master)


# --- 2. an open proxy: what a web page cannot send ------------------------------------------------------

@pytest.mark.parametrize("host", ["evil.example", "evil.example:4000", "127.0.0.1.evil.example", "localhost.evil",
                                  "10.0.0.5:4000", "[::ffff:127.0.0.1]"])
def test_open_proxy_refuses_hosts_that_are_not_this_machine(config: Path, start_proxy, host: str) -> None:  # type: ignore[no-untyped-def]
    proxy = start_proxy(config)
    headers = {"host": host}
    assert "Host" in error(chat(proxy.url, headers=headers), 403, "host_not_allowed")
    error(httpx.get(proxy.url + "/v1/models", headers=headers), 403, "host_not_allowed")
    for path in ADMIN:  # DNS rebinding would otherwise read every row
        error(httpx.get(proxy.url + path, headers=headers), 403, "host_not_allowed")


@pytest.mark.parametrize("host", ["localhost", "LOCALHOST:4000", "127.0.0.1", "127.0.0.1:4000", "127.1.2.3:80", "[::1]",
                                  "[::1]:4000"])
def test_open_proxy_takes_loopback_hosts(config: Path, start_proxy, host: str) -> None:  # type: ignore[no-untyped-def]
    proxy = start_proxy(config)
    assert chat(proxy.url, headers={"host": host}).status_code == 200
    assert httpx.get(proxy.url + "/spend/logs", headers={"host": host}).status_code == 200


@pytest.mark.parametrize("content_type", [None, "text/plain", "text/plain;charset=UTF-8", "application/x-www-form-urlencoded",
                                          "multipart/form-data; boundary=x", "application/jsonp"])
def test_open_proxy_takes_only_json_bodies(config: Path, start_proxy, content_type: str | None) -> None:  # type: ignore[no-untyped-def]
    proxy = start_proxy(config)
    body = b'{"model": "quick", "messages": [{"role": "user", "content": "hello"}]}'
    headers = {"content-type": content_type} if content_type else {}
    message = error(chat(proxy.url, content=body, headers=headers), 415, "unsupported_media_type")
    assert "Content-Type: application/json" in message


@pytest.mark.parametrize("content_type", ["application/json", "application/json; charset=utf-8", "Application/JSON",
                                          "application/vnd.delegate+json"])
def test_open_proxy_takes_json_content_types(config: Path, start_proxy, content_type: str) -> None:  # type: ignore[no-untyped-def]
    proxy = start_proxy(config)
    body = b'{"model": "quick", "messages": [{"role": "user", "content": "hello"}]}'
    assert chat(proxy.url, content=body, headers={"content-type": content_type}).status_code == 200


def test_open_proxy_still_serves_the_sdk(config: Path, start_proxy) -> None:  # type: ignore[no-untyped-def]
    proxy = start_proxy(config)
    c = openai.OpenAI(base_url=proxy.url + "/v1", api_key="sk-local", max_retries=0)
    assert c.chat.completions.create(model="quick", messages=MSG).choices[0].message.content == "answer from ok"  # type: ignore[arg-type]
    localhost = openai.OpenAI(base_url=f"http://localhost:{proxy.port}/v1", api_key="sk-local", max_retries=0)
    assert [m.id for m in localhost.models.list().data] == ["coding", "quick", "auto"]  # auto: two aliases it may pick among


def test_a_keyed_proxy_is_not_bound_to_loopback_names(config: Path, start_proxy) -> None:  # type: ignore[no-untyped-def]
    """With a key required, a page cannot forge the request anyway: other names and bodies are the operator's call."""
    proxy = start_proxy(config, master_key=MASTER)
    assert chat(proxy.url, MASTER, headers={"host": "delegate.internal"}).status_code == 200
    error(chat(proxy.url, headers={"host": "delegate.internal"}), 401)


# --- 5. the key store: off the event loop, failing closed -----------------------------------------------

@pytest.fixture
def stores(tmp_path: Path, fake_backend, start_proxy, monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    """A Postgres server of this test's own, three proxies on it (master key; issued keys, no master key; an open
    one on a database with no keys), an issued key, and the server's pg_ctl."""
    import psycopg

    from tests.conftest import postgres_server

    _, url = fake_backend("ok")
    config = write_config(tmp_path / "c.yaml", [("quick", "openai/ok", url)], aliases=["quick"])
    with postgres_server() as (pg_url, ctl):
        with psycopg.connect(pg_url, autocommit=True) as admin:
            admin.execute("CREATE DATABASE nokeys")
        monkeypatch.setenv("DELEGATE_DATABASE_URL", pg_url)
        key, _ = KeyStore(UsageStore.open()).create(name="budgeted", budget_usd=5.0)
        free, _ = KeyStore(UsageStore.open()).create(name="no budget: nothing but the key check reads the store")
        keyed, keyed_no_master = start_proxy(config, master_key=MASTER), start_proxy(config)
        monkeypatch.setenv("DELEGATE_DATABASE_URL", pg_url.rsplit("/", 1)[0] + "/nokeys")
        open_proxy = start_proxy(config)
        assert chat(keyed.url, key).status_code == 200
        assert chat(keyed.url, free).status_code == 200 and chat(keyed_no_master.url, free).status_code == 200
        assert chat(keyed_no_master.url).status_code == 401
        assert chat(open_proxy.url).status_code == 200
        yield {"pg": pg_url, "ctl": ctl, "key": key, "free": free, "keyed": keyed.url, "keyed_no_master": keyed_no_master.url,
               "open": open_proxy.url}


def test_a_slow_key_store_never_stalls_the_event_loop(stores) -> None:  # type: ignore[no-untyped-def]
    """Another session holds the keys table: the requests that need it wait in a worker thread, the rest go on."""
    import psycopg

    with psycopg.connect(stores["pg"]) as locker:
        locker.execute("LOCK TABLE keys IN ACCESS EXCLUSIVE MODE")
        waiting: list[httpx.Response] = []
        stuck = threading.Thread(target=lambda: waiting.append(chat(stores["keyed"], stores["key"])))
        stuck.start()
        time.sleep(0.5)  # the issued key's check is now blocked on the lock
        assert stuck.is_alive()
        start = time.monotonic()
        assert chat(stores["keyed"], MASTER, timeout=5).status_code == 200
        assert httpx.get(stores["keyed"] + "/health/liveliness", timeout=5).status_code == 200
        assert time.monotonic() - start < 1.0, "the event loop waited for the key store"
        locker.rollback()  # the lock goes
    stuck.join(30)
    assert waiting and waiting[0].status_code == 200


def test_an_unreachable_key_store_lets_no_one_in(stores) -> None:  # type: ignore[no-untyped-def]
    """Whatever was seen before the store went away: 503 with Retry-After, not a pass. The master key needs no store."""
    stores["ctl"]("stop")
    try:
        time.sleep(1.1)  # past the second for which what the store said about keys is trusted
        for r in (chat(stores["keyed"], stores["free"]), chat(stores["keyed_no_master"], stores["free"]),
                  chat(stores["keyed"], stores["key"]), chat(stores["keyed_no_master"]), chat(stores["open"])):
            assert "unreachable" in error(r, 503, "store_unavailable")
            assert int(r.headers["retry-after"]) >= 1
        assert chat(stores["keyed"], MASTER).status_code == 200
    finally:
        stores["ctl"]("start")
    deadline = time.monotonic() + 10
    while chat(stores["keyed"], stores["key"]).status_code != 200:
        assert time.monotonic() < deadline, "the proxy did not recover when the store came back"
        time.sleep(0.2)
