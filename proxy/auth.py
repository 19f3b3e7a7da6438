"""Who is asking: the Bearer key on each request, checked before anything else is read.

Three kinds of caller: the master key (`DELEGATE_MASTER_KEY`), an issued key (proxy/keys.py: limited to
some aliases, a budget and a rate), or nobody, which is allowed only while the proxy is open (no master
key and no active issued key; it then binds loopback only). Keys are compared in constant time or by
hash, and never logged; rows and reports carry a short hash (key_id).
"""

from __future__ import annotations

import hmac
import time
from dataclasses import dataclass

from proxy.errors import ProxyError, unauthorized
from proxy.keys import IssuedKey, KeyStore, key_hash, key_id

OPEN_CHECK_S = 1.0  # how long "no issued key exists" is trusted before asking the store again


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


class Auth:
    def __init__(self, master_key: str | None, keys: KeyStore | None = None) -> None:
        self._master = master_key.encode("utf-8") if master_key else None
        self.keys = keys
        self._open_until = 0.0
        self._was_open = True
        self._seen: dict[str, IssuedKey] = {}  # key hash -> record, for when the store cannot be read

    def _open(self) -> bool:
        if self._master is not None:
            return False
        if self.keys is None or time.monotonic() < self._open_until:
            return True
        try:
            self._was_open = not self.keys.any_active()
        except Exception:  # noqa: BLE001 - the store is down: keep the last answer it gave
            return self._was_open
        if self._was_open:
            self._open_until = time.monotonic() + OPEN_CHECK_S
        return self._was_open

    def _find(self, token: str) -> IssuedKey | None:
        """The issued key for `token`. While the store cannot be read, the last record seen for it stands
        (a key never seen cannot be checked: 503, never a pass)."""
        assert self.keys is not None
        digest = key_hash(token)
        try:
            issued = self.keys.find(token)
        except Exception as e:
            if digest in self._seen:
                return self._seen[digest]
            raise ProxyError(503, "API keys cannot be checked now: the store is unreachable", type_="service_unavailable",
                             code="store_unavailable", retry_after=5) from e
        if issued is not None:
            self._seen[digest] = issued
        return issued

    def check(self, authorization: str | None) -> Caller:
        """The caller behind this Authorization header; 401 for a wrong, revoked, expired or missing key."""
        token = bearer(authorization)
        if token is not None:
            # latin-1 is how the HTTP layer decoded the header: get the client's bytes back for the comparison
            if self._master is not None and hmac.compare_digest(token.encode("latin-1", "replace"), self._master):
                return Caller(key_id(token), master=True)
            issued = self._find(token) if self.keys is not None else None
            if issued is not None:
                if issued.revoked_at is not None:
                    raise unauthorized("this API key has been revoked")
                if not issued.active(time.time()):
                    raise unauthorized("this API key has expired")
                return Caller(issued.key_id, issued)
        if self._open():
            return Caller(key_id(token) if token else None)
        if token is None:
            raise unauthorized("missing API key: send 'Authorization: Bearer <key>'")
        raise unauthorized("invalid API key")

    def check_admin(self, authorization: str | None) -> Caller:
        """Spend logs, reports and the savings page: the master key, when one is set."""
        caller = self.check(authorization)
        if self._master is not None and not caller.master:
            raise ProxyError(403, "this needs the master key", type_="permission_error", code="forbidden")
        return caller
