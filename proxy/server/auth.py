"""Who is asking: the Bearer key on each request, checked before anything else is read.

Three kinds of caller: the master key (`DELEGATE_MASTER_KEY`), an issued key (proxy/usage/keys.py: limited to
some aliases, a budget and a rate), or nobody, which is allowed only while the proxy is open (no master
key and no active issued key; it then binds loopback only). Keys are compared in constant time or by
hash, and never logged; rows and reports carry a short hash (key_id).

An open proxy answers only requests a web page cannot forge: the Host header must name this machine
(localhost, 127.x, [::1]: no DNS rebinding) and a POST body must be JSON (no cross-site form or text/plain
POST). Admin endpoints (spend logs, reports, the savings page's data) take the master key alone; without
one they answer loopback clients only, and never an issued key. The savings page signs in with a form
that trades the master key for an HMAC session cookie (`session_token`), so the key never sits in a URL.

The store is asked in a worker thread (a slow Postgres must not stall the event loop), and when it cannot
answer, a request that needs it is refused with 503 and Retry-After, never let in. The master key and an
open proxy need no store call per request ("no key is active" is trusted for OPEN_CHECK_S).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import ipaddress
import re
import time
from dataclasses import dataclass

from starlette.requests import Request

from proxy.server.errors import ProxyError, unauthorized
from proxy.usage.keys import IssuedKey, KeyStore, key_id

OPEN_CHECK_S = 1.0  # how long what the store said about issued keys is trusted before asking it again
STORE_RETRY_S = 5
SESSION_COOKIE = "delegate_ui"
SESSION_S = 12 * 3600  # a savings-page sign-in lasts this long
_LOOPBACK_HOST = re.compile(r"(?:localhost|127(?:\.\d{1,3}){3}|\[::1\])(?::\d{1,5})?", re.IGNORECASE | re.ASCII)
ADMIN_WHAT = "spend logs, reports and the savings page"


@dataclass(frozen=True)
class Caller:
    key_id: str | None
    issued: IssuedKey | None = None
    master: bool = False


def bearer(header: str | None) -> str | None:
    if not header:
        return None
    scheme, _, token = header.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


def is_loopback_address(host: str | None) -> bool:
    """Whether a client address (request.client.host) is this machine."""
    if not host:
        return False
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback


def is_json(content_type: str | None) -> bool:
    """application/json or application/<something>+json, with any parameters."""
    if not content_type:
        return False
    mime = content_type.split(";", 1)[0].strip().lower()
    return mime == "application/json" or (mime.startswith("application/") and mime.endswith("+json"))


def forbidden(message: str, code: str = "forbidden") -> ProxyError:
    return ProxyError(403, message, type_="permission_error", code=code)


def store_unavailable(what: str) -> ProxyError:
    return ProxyError(503, f"{what} cannot be checked now: the key store is unreachable; retry shortly",
                      type_="service_unavailable", code="store_unavailable", retry_after=STORE_RETRY_S)


def check_host(request: Request) -> None:
    """Without a key, only requests addressed to this machine: a page on another name that resolves here
    (DNS rebinding) gets 403, not the proxy. No Host header at all is not a browser's request."""
    host = request.headers.get("host")
    if host is not None and not _LOOPBACK_HOST.fullmatch(host):
        raise forbidden(f"the Host header {host[:100]!r} does not name this machine: without a key the proxy answers "
                        "only requests addressed to localhost, 127.0.0.1 or [::1]. To serve other names, set "
                        "DELEGATE_MASTER_KEY and send 'Authorization: Bearer <key>'", code="host_not_allowed")


def check_json_body(request: Request) -> None:
    if not is_json(request.headers.get("content-type")):
        raise ProxyError(415, "the body must be JSON: send 'Content-Type: application/json' (without a key the proxy "
                              "takes no other kind of body, which a web page could send cross-site)",
                         code="unsupported_media_type")


class Auth:
    def __init__(self, master_key: str | None, keys: KeyStore | None = None) -> None:
        self._master = master_key.encode("utf-8") if master_key else None
        self.keys = keys
        self._presence = (False, False)  # (a key was ever issued, a key is active), from the store
        self._presence_until = 0.0
        self._asking: asyncio.Future[tuple[bool, bool]] | None = None

    @property
    def has_master(self) -> bool:
        return self._master is not None

    def is_master(self, token: str | None) -> bool:
        # latin-1 is how the HTTP layer decoded the header: get the client's bytes back for the comparison
        return (self._master is not None and token is not None
                and hmac.compare_digest(token.encode("latin-1", "replace"), self._master))

    # --- the store, off the event loop, failing closed -----------------------------------------------

    async def _key_presence(self) -> tuple[bool, bool]:
        if self.keys is None:
            return False, False
        if time.monotonic() < self._presence_until:
            return self._presence
        asking = self._asking
        if asking is None:  # one question at a time, however many requests wait for the answer
            asking = self._asking = asyncio.ensure_future(self._ask_presence(self.keys))
            asking.add_done_callback(lambda f: f.cancelled() or f.exception())  # retrieved, even if no one waits
        return await asyncio.shield(asking)

    async def _ask_presence(self, keys: KeyStore) -> tuple[bool, bool]:
        try:
            presence = await asyncio.to_thread(keys.presence)
        except Exception as e:
            raise store_unavailable("API keys") from e
        finally:
            self._asking = None
        self._presence, self._presence_until = presence, time.monotonic() + OPEN_CHECK_S
        return presence

    async def _find(self, token: str) -> IssuedKey | None:
        assert self.keys is not None
        try:
            return await asyncio.to_thread(self.keys.find, token)
        except Exception as e:
            raise store_unavailable("API keys") from e

    @staticmethod
    def _live(issued: IssuedKey) -> Caller:
        if issued.revoked_at is not None:
            raise unauthorized("this API key has been revoked")
        if not issued.active(time.time()):
            raise unauthorized("this API key has expired")
        return Caller(issued.key_id, issued)

    # --- the checks ----------------------------------------------------------------------------------

    async def check(self, request: Request) -> Caller:
        """The caller behind this request; 401 for a wrong, revoked, expired or missing key, 503 when the store
        that would tell cannot be read."""
        token = bearer(request.headers.get("authorization"))
        if self._master is not None:
            if self.is_master(token):
                return Caller(key_id(token), master=True)  # type: ignore[arg-type]
        else:
            ever, active = await self._key_presence()
            if not active:  # open: no key needed, but only what a web page cannot send
                check_host(request)
                if request.method == "POST":
                    check_json_body(request)
                if token is None or not ever:
                    return Caller(key_id(token) if token else None)
                # only revoked or expired keys exist: their holders are told, not let in under a dead key
                issued = await self._find(token)
                return self._live(issued) if issued is not None else Caller(key_id(token))
        if token is None:
            raise unauthorized("missing API key: send 'Authorization: Bearer <key>'")
        issued = await self._find(token) if self.keys is not None else None
        if issued is None:
            raise unauthorized("invalid API key")
        return self._live(issued)

    async def check_admin(self, request: Request, session: bool = False) -> Caller:
        """Spend logs, reports and the savings page's data: the master key (or, with `session`, the savings page's
        sign-in cookie). Without a master key: clients on this machine only, addressed to it by a loopback name,
        and never with an issued key."""
        token = bearer(request.headers.get("authorization"))
        if self._master is not None:
            if self.is_master(token):
                return Caller(key_id(token), master=True)  # type: ignore[arg-type]
            if session and self.valid_session(request.cookies.get(SESSION_COOKIE)):
                return Caller(None, master=True)
            if token is None:
                raise unauthorized("this needs the master key: send 'Authorization: Bearer <master key>'"
                                   + (", or sign in on the page at /ui" if session else ""))
            await self.refuse_issued(token)
            raise unauthorized("invalid API key")
        client = request.client.host if request.client else None
        if not is_loopback_address(client):
            raise forbidden(f"without DELEGATE_MASTER_KEY, {ADMIN_WHAT} answer only on this machine (loopback); "
                            "set the master key to read them from elsewhere")
        check_host(request)
        if token is not None:
            await self.refuse_issued(token)
        return Caller(key_id(token) if token else None)

    async def refuse_issued(self, token: str) -> None:
        """403 if `token` is an issued key: those never read what other keys did."""
        if self.keys is not None and await self._find(token) is not None:
            hint = "" if self._master is not None else ", and none is set: read them on this machine without a key"
            raise forbidden(f"an issued key cannot read {ADMIN_WHAT}: they need the master key{hint}")

    # --- the savings page's sign-in ------------------------------------------------------------------

    def _session_mac(self, expires: int) -> str:
        assert self._master is not None
        return hmac.new(self._master, b"delegate ui session v1 " + str(expires).encode(), hashlib.sha256).hexdigest()

    def session_token(self, now: float | None = None) -> str:
        """A sign-in for the savings page: `v1.<expiry>.<HMAC of the expiry under the master key>`. Not the key:
        a leaked cookie opens only /ui/data, only until it expires, and changing the master key ends every one."""
        expires = int((time.time() if now is None else now) + SESSION_S)
        return f"v1.{expires}.{self._session_mac(expires)}"

    def valid_session(self, cookie: str | None) -> bool:
        if not cookie or self._master is None:
            return False
        version, _, rest = cookie.partition(".")
        expires, _, mac = rest.partition(".")
        if version != "v1" or not expires.isdigit() or len(expires) > 12:
            return False
        now = time.time()
        if not now < int(expires) <= now + SESSION_S + 60:
            return False
        return hmac.compare_digest(mac.encode("latin-1", "replace"), self._session_mac(int(expires)).encode())
