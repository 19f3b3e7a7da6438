"""Issued API keys: each limited to some aliases, a budget in reference dollars and a request rate.

Keys live in the usage store (table `keys`, migration m002_keys in store.py), stored as SHA-256 hashes: the key itself is
shown once, at creation. A budget is never overspent by concurrent requests: before a call the request's
worst case (every byte of the prompt a token, every allowed completion token used, at the reference
model's price) is reserved with one conditional UPDATE, and after the call the reservation is swapped for
the real cost. With several replicas on one Postgres, that UPDATE is the lock.
The request rate is a sliding minute per key, per process.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

from proxy.store import UsageStore

PREFIX = "sk-dlg-"


def key_hash(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8", "surrogateescape")).hexdigest()


def key_id(key: str) -> str:
    """A stable, non-reversible name for a key, for usage rows and reports (the hash's first 16 digits)."""
    return "key_" + key_hash(key)[:16]


@dataclass(frozen=True)
class IssuedKey:
    key_id: str
    name: str | None
    aliases: tuple[str, ...] | None  # None: every alias
    budget_usd: float | None
    spent_usd: float
    reserved_usd: float
    rpm: int | None
    created_at: float
    expires_at: float | None
    revoked_at: float | None

    def active(self, now: float) -> bool:
        return self.revoked_at is None and (self.expires_at is None or self.expires_at > now)

    def as_dict(self) -> dict[str, Any]:
        return {**self.__dict__, "aliases": list(self.aliases) if self.aliases is not None else None,
                "active": self.active(time.time())}


_COLUMNS = "key_id, name, aliases, budget_usd, spent_usd, reserved_usd, rpm, created_at, expires_at, revoked_at"


def _issued(row: tuple[Any, ...]) -> IssuedKey:
    aliases = json.loads(row[2]) if row[2] is not None else None
    return IssuedKey(row[0], row[1], tuple(aliases) if aliases is not None else None, *row[3:])


class KeyStore:
    def __init__(self, store: UsageStore) -> None:
        self.db = store.db

    def create(self, name: str | None = None, aliases: list[str] | None = None, budget_usd: float | None = None,
               rpm: int | None = None, expires_at: float | None = None) -> tuple[str, IssuedKey]:
        key = PREFIX + secrets.token_urlsafe(32)
        self.db.execute(
            "INSERT INTO keys (key_id, key_hash, name, aliases, budget_usd, rpm, created_at, expires_at) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (key_id(key), key_hash(key), name, json.dumps(aliases) if aliases is not None else None, budget_usd, rpm,
             time.time(), expires_at))
        found = self.get(key_id(key))
        assert found is not None
        return key, found

    def get(self, kid: str) -> IssuedKey | None:
        rows = self.db.execute(f"SELECT {_COLUMNS} FROM keys WHERE key_id = ?", (kid,))
        return _issued(rows[0]) if rows else None

    def find(self, key: str) -> IssuedKey | None:
        rows = self.db.execute(f"SELECT {_COLUMNS} FROM keys WHERE key_hash = ?", (key_hash(key),))
        return _issued(rows[0]) if rows else None

    def all(self) -> list[IssuedKey]:
        return [_issued(r) for r in self.db.execute(f"SELECT {_COLUMNS} FROM keys ORDER BY created_at")]

    def any_active(self) -> bool:
        now = time.time()
        return bool(self.db.execute("SELECT 1 FROM keys WHERE revoked_at IS NULL AND (expires_at IS NULL OR expires_at > ?)"
                                    " LIMIT 1", (now,)))

    def revoke(self, kid: str) -> bool:
        return bool(self.db.execute("UPDATE keys SET revoked_at = ? WHERE key_id = ? AND revoked_at IS NULL RETURNING key_id",
                                    (time.time(), kid)))

    def reserve(self, kid: str, amount: float) -> bool:
        """Hold `amount` of the key's budget; False when spent + held + amount would pass the budget."""
        return bool(self.db.execute(
            "UPDATE keys SET reserved_usd = reserved_usd + ? WHERE key_id = ? AND "
            "(budget_usd IS NULL OR spent_usd + reserved_usd + ? <= budget_usd) RETURNING key_id",
            (amount, kid, amount)))

    def settle(self, kid: str, reserved: float, actual: float) -> None:
        """Swap a reservation for what the request really cost."""
        self.db.execute("UPDATE keys SET reserved_usd = CASE WHEN reserved_usd > ? THEN reserved_usd - ? ELSE 0 END, "
                        "spent_usd = spent_usd + ? WHERE key_id = ?", (reserved, reserved, actual, kid))


class RateLimiter:
    """Requests per rolling minute, per key."""

    def __init__(self) -> None:
        self._seen: dict[str, deque[float]] = {}
        self._lock = threading.Lock()

    def allow(self, kid: str, rpm: int, now: float | None = None) -> float | None:
        """None if the request may go now, else the seconds until it may."""
        now = time.monotonic() if now is None else now
        with self._lock:
            window = self._seen.setdefault(kid, deque())
            while window and window[0] <= now - 60:
                window.popleft()
            if len(window) >= rpm:
                return window[0] + 60 - now
            window.append(now)
            return None
