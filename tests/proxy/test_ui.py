"""The savings page, rendered by a real headless Chromium (Debian's `chromium`) against the real proxy, and its
sign-in: a form that trades the master key for an HttpOnly session cookie, never a key in the address.

A screenshot is kept in test-artifacts/savings-page.png.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from proxy.usage.keys import KeyStore
from proxy.usage.store import UsageStore
from tests.conftest import write_config
from tests.proxy.test_report import row
from tests.servers import ROOT

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARTIFACTS = ROOT / "test-artifacts"


def chromium(url: str, *extra: str) -> str:
    if not Path(CHROMIUM).exists():
        pytest.fail("chromium is not installed: `make test` installs it (apt-get install chromium)")
    profile = ARTIFACTS / "chromium-profile"
    args = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            f"--user-data-dir={profile}", "--virtual-time-budget=4000", *extra, url]
    result = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


def test_savings_page_renders_chart_tasks_and_recent_requests(tmp_path: Path, fake_backend, start_proxy) -> None:  # type: ignore[no-untyped-def]
    """No master key: the page answers this machine without a sign-in."""
    now = time.time()
    rows = [row(i, created_at=now - 86400 * (i % 5) - 60, request_id=f"req_{i}",
                alias=("coding", "quick", "review")[i % 3]) for i in range(12)]
    UsageStore.open().insert(rows)
    _, url = fake_backend("ok")
    proxy = start_proxy(write_config(tmp_path / "c.yaml", [("coding", "openai/ok", url)]))
    ARTIFACTS.mkdir(exist_ok=True)

    dom = chromium(f"{proxy.url}/ui?days=7", "--dump-dom")
    saved = sum(r["saved"] for r in rows)
    assert f"${saved:.4f} (98%)" in dom  # the Saved card, from the page's own fetch of /ui/data
    assert "$0.0720" in dom  # Claude would have cost
    path = re.search(r'id="saved-line" d="([^"]+)"', dom)
    assert path is not None and path.group(1).count("L") == 6  # one point per day of the week shown
    assert len(re.findall(r'class="bar"', dom)) == 7
    for task in ("coding", "quick", "review"):
        assert f'data-task="{task}"' in dom
    assert 'data-source="api"' in dom  # the rows here came through the API
    # three header rows, a row per task, one per source, the twelve requests
    assert dom.count("<tr") == 3 + 3 + 1 + 12

    shot = ARTIFACTS / "savings-page.png"
    shot.unlink(missing_ok=True)
    chromium(f"{proxy.url}/ui?days=7", f"--screenshot={shot}", "--window-size=1100,1000")
    assert shot.exists() and shot.stat().st_size > 10_000


MASTER = "sk-ui-master-0123456789"


@pytest.fixture
def keyed(tmp_path: Path, fake_backend, start_proxy):  # type: ignore[no-untyped-def]
    _, url = fake_backend("ok")
    return start_proxy(write_config(tmp_path / "c.yaml", [("coding", "openai/ok", url)]), master_key=MASTER)


def test_savings_page_without_a_sign_in_shows_the_form(keyed) -> None:  # type: ignore[no-untyped-def]
    ARTIFACTS.mkdir(exist_ok=True)
    dom = chromium(f"{keyed.url}/ui", "--dump-dom")
    assert "sign in to see usage (HTTP 401)" in dom
    assert re.search(r'<section id="login">', dom)  # shown: no `hidden` attribute left
    assert re.search(r'<div id="report" hidden="">', dom)


class Browser:
    """Headless Chromium driven over the DevTools protocol on a pipe (--remote-debugging-pipe: fd 3 in, fd 4 out,
    messages ending in NUL), to fill in and submit the page's own form."""

    def __init__(self, profile: Path) -> None:
        if not Path(CHROMIUM).exists():
            pytest.fail("chromium is not installed: `make test` installs it (apt-get install chromium)")
        commands_r, commands_w = os.pipe()
        replies_r, replies_w = os.pipe()

        def pipes_at_3_and_4() -> None:
            inp, out = os.dup(commands_r), os.dup(replies_w)  # out of the way of 3 and 4 first
            os.dup2(inp, 3)
            os.dup2(out, 4)

        self.proc = subprocess.Popen(
            [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", f"--user-data-dir={profile}", "--remote-debugging-pipe",
             "about:blank"], pass_fds=(3, 4), preexec_fn=pipes_at_3_and_4, stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL)
        os.close(commands_r)
        os.close(replies_w)
        self.commands, self.replies = os.fdopen(commands_w, "wb", buffering=0), os.fdopen(replies_r, "rb", buffering=0)
        self.pending, self.sent = b"", 0
        self.session: str | None = None

    def call(self, method: str, params: dict | None = None) -> dict:  # type: ignore[type-arg]
        self.sent += 1
        message = {"id": self.sent, "method": method, "params": params or {}}
        if self.session:
            message["sessionId"] = self.session
        self.commands.write(json.dumps(message).encode() + b"\0")
        while True:
            while b"\0" not in self.pending:
                chunk = self.replies.read(65536)
                assert chunk, "chromium closed its DevTools pipe"
                self.pending += chunk
            raw, _, self.pending = self.pending.partition(b"\0")
            reply = json.loads(raw)
            if reply.get("id") == self.sent:
                assert "error" not in reply, reply["error"]
                return reply["result"]  # type: ignore[no-any-return]

    def open(self, url: str) -> None:
        target = self.call("Target.createTarget", {"url": url})["targetId"]
        self.session = self.call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]

    def js(self, expression: str) -> object:
        result = self.call("Runtime.evaluate", {"expression": expression, "awaitPromise": True, "returnByValue": True})
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 15) -> object:
        deadline = time.monotonic() + timeout
        while not (value := self.js(expression)):
            assert time.monotonic() < deadline, f"never true in the page: {expression}"
            time.sleep(0.1)
        return value

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.session = None
            self.call("Browser.close")
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def test_signing_in_on_the_page_in_a_real_browser(tmp_path: Path, keyed) -> None:  # type: ignore[no-untyped-def]
    UsageStore.open().insert([row(i, created_at=time.time() - 60 * (i + 1), request_id=f"req_{i}") for i in range(3)])
    browser = Browser(tmp_path / "profile")
    try:
        browser.open(keyed.url + "/ui")
        browser.wait_for("!document.getElementById('login').hidden")
        browser.js(f"document.getElementById('login-key').value = {json.dumps('sk-wrong')};"
                   "document.getElementById('login-form').requestSubmit()")
        assert "not the master key" in str(browser.wait_for("document.getElementById('login-error').textContent"))
        browser.js(f"document.getElementById('login-key').value = {json.dumps(MASTER)};"
                   "document.getElementById('login-form').requestSubmit()")
        assert browser.wait_for("document.getElementById('saved').textContent.startsWith('$0.0177')")
        assert browser.js("document.getElementById('login-key').value") == ""  # the page keeps no copy of the key
        assert browser.js("document.cookie") == ""  # HttpOnly: no script on the page can read the session
        assert browser.js("location.href") == keyed.url + "/ui"  # nothing went into the address
        browser.js("window.reloaded = false; location.reload()")  # the session outlives the page
        # the old page answers until the new one replaces it: wait for the new one (it has no `reloaded`)
        browser.wait_for("window.reloaded === undefined && document.readyState === 'complete' && "
                         "!document.getElementById('logout').hidden")
        assert browser.js("document.getElementById('login').hidden") is True
        browser.js("document.getElementById('logout').click()")
        browser.wait_for("!document.getElementById('login').hidden")
        browser.js("window.reloaded = false; location.reload()")
        browser.wait_for("window.reloaded === undefined && document.readyState === 'complete' && "
                         "!document.getElementById('login').hidden")
    finally:
        browser.close()


def login(proxy, key: str, **kw) -> httpx.Response:  # type: ignore[no-untyped-def]
    return httpx.post(proxy.url + "/ui/login", json={"key": key}, **kw)


def test_sign_in_sets_an_httponly_strict_session_cookie_that_is_not_the_key(keyed) -> None:  # type: ignore[no-untyped-def]
    r = login(keyed, MASTER)
    assert r.status_code == 200, r.text
    cookie = r.headers["set-cookie"]
    name, _, rest = cookie.partition("=")
    value = rest.split(";", 1)[0]
    attributes = {a.strip().split("=")[0].lower(): a.strip() for a in cookie.split(";")[1:]}
    assert name == "delegate_ui" and MASTER not in cookie and len(value) > 40
    assert "httponly" in attributes and attributes["samesite"].lower() == "samesite=strict"
    assert attributes["path"] == "Path=/ui" and int(attributes["max-age"].split("=")[1]) > 0

    data = httpx.get(keyed.url + "/ui/data", cookies={"delegate_ui": value})
    assert data.status_code == 200 and data.json()["signed_in"] is True
    # the cookie opens the page's data only: not the spend API, not inference
    assert httpx.get(keyed.url + "/spend/logs", cookies={"delegate_ui": value}).status_code == 401
    assert httpx.post(keyed.url + "/v1/chat/completions", cookies={"delegate_ui": value},
                      json={"model": "coding", "messages": [{"role": "user", "content": "x"}]}).status_code == 401
    # a header still works for scripts
    assert httpx.get(keyed.url + "/ui/data", headers={"authorization": f"Bearer {MASTER}"}).json()["signed_in"] is False

    out = httpx.post(keyed.url + "/ui/logout", cookies={"delegate_ui": value})
    assert out.status_code == 200 and 'delegate_ui=""' in out.headers["set-cookie"]
    assert "max-age=0" in out.headers["set-cookie"].lower()


def test_a_session_survives_a_restart_and_is_shared_by_replicas(tmp_path: Path, keyed, fake_backend, start_proxy) -> None:  # type: ignore[no-untyped-def]
    value = login(keyed, MASTER).cookies["delegate_ui"]
    _, url = fake_backend("ok")
    other = start_proxy(write_config(tmp_path / "d.yaml", [("coding", "openai/ok", url)]), master_key=MASTER)
    assert httpx.get(other.url + "/ui/data", cookies={"delegate_ui": value}).status_code == 200
    rotated = start_proxy(write_config(tmp_path / "e.yaml", [("coding", "openai/ok", url)]), master_key=MASTER + "-new")
    assert httpx.get(rotated.url + "/ui/data", cookies={"delegate_ui": value}).status_code == 401


@pytest.mark.parametrize("forged", ["", "v1", "v1.9999999999.", "v2.1.abc", f"v1.{int(time.time()) - 10}.abc",
                                    MASTER, "v1." + "9" * 30 + ".x"])
def test_forged_or_expired_sessions_are_refused(keyed, forged: str) -> None:  # type: ignore[no-untyped-def]
    assert httpx.get(keyed.url + "/ui/data", cookies={"delegate_ui": forged}).status_code == 401


def test_an_altered_session_is_refused(keyed) -> None:  # type: ignore[no-untyped-def]
    version, expires, mac = login(keyed, MASTER).cookies["delegate_ui"].split(".")
    later = f"{version}.{int(expires) + 3600}.{mac}"  # a longer life, with the old signature
    assert httpx.get(keyed.url + "/ui/data", cookies={"delegate_ui": later}).status_code == 401


def test_sign_in_refusals(keyed) -> None:  # type: ignore[no-untyped-def]
    r = login(keyed, "sk-wrong")
    assert r.status_code == 401 and "set-cookie" not in r.headers
    issued, _ = KeyStore(UsageStore.open()).create()
    r = login(keyed, issued)
    assert r.status_code == 403 and "master key" in r.json()["error"]["message"]
    # a form post from another site cannot sign a browser in
    r = httpx.post(keyed.url + "/ui/login", content=f"key={MASTER}",
                   headers={"content-type": "application/x-www-form-urlencoded"})
    assert r.status_code == 415 and "set-cookie" not in r.headers
    r = httpx.post(keyed.url + "/ui/login", json={"key": 5})
    assert r.status_code == 400 and r.json()["error"]["param"] == "key"


@pytest.mark.parametrize("path", ["/ui", "/ui/data"])
def test_a_key_in_the_address_is_refused_with_a_message(keyed, path: str) -> None:  # type: ignore[no-untyped-def]
    r = httpx.get(f"{keyed.url}{path}?key={MASTER}&days=7")
    assert r.status_code == 400
    error = r.json()["error"]
    assert error["code"] == "key_in_url" and "sign in" in error["message"] and MASTER not in r.text


def test_without_a_master_key_there_is_nothing_to_sign_into(tmp_path: Path, fake_backend, start_proxy) -> None:  # type: ignore[no-untyped-def]
    _, url = fake_backend("ok")
    proxy = start_proxy(write_config(tmp_path / "c.yaml", [("coding", "openai/ok", url)]))
    r = login(proxy, "anything")
    assert r.status_code == 400 and "no master key" in r.json()["error"]["message"]
    assert httpx.get(proxy.url + "/ui/data").json()["signed_in"] is False
