"""Who is asking: the Bearer key on each request, checked before anything else is read.

With `DELEGATE_MASTER_KEY` set, every request needs it; without, the proxy is open (it then only binds
loopback). Keys are compared in constant time and never logged; rows and reports carry a short hash.
"""

from __future__ import annotations

import hashlib
import hmac

from proxy.errors import unauthorized


def key_id(key: str) -> str:
    """A stable, non-reversible name for a key, for usage rows and reports."""
    return "key_" + hashlib.sha256(key.encode("utf-8", "surrogateescape")).hexdigest()[:16]


def bearer(header: str | None) -> str | None:
    if not header:
        return None
    scheme, _, token = header.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


class Auth:
    def __init__(self, master_key: str | None) -> None:
        self._master = master_key.encode("utf-8") if master_key else None

    @property
    def required(self) -> bool:
        return self._master is not None

    def check(self, authorization: str | None) -> str | None:
        """The caller's key id, or None when the proxy is open and no key was sent; 401 otherwise."""
        token = bearer(authorization)
        if self._master is None:
            return key_id(token) if token else None
        if token is None:
            raise unauthorized("missing API key: send 'Authorization: Bearer <key>'")
        # latin-1 is how the HTTP layer decoded the header: get the client's bytes back for the comparison
        raw = token.encode("latin-1", "replace")
        if not hmac.compare_digest(raw, self._master):
            raise unauthorized("invalid API key")
        return key_id(token)
