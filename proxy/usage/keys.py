"""Issued API keys: each limited to some aliases, a budget in reference dollars and a request rate.

Keys live in the usage store (table `keys`, migration m002_keys in store.py), stored as SHA-256 hashes: the key itself is
shown once, at creation. A budget is never overspent by concurrent requests: before a call the request's
worst case (every byte of the prompt a token, every allowed completion token used, at the reference
model's price) is reserved with one conditional UPDATE, and after the call the reservation is swapped for
the real cost. With several replicas on one Postgres, that UPDATE is the lock.

Each reservation is also a row in `holds` (migration m003_holds), written in the same transaction and naming
the process that made it (`owner`). The live process renews its holds' `renewed_at` every HOLD_RENEW_S; a
hold not renewed for HOLD_STALE_S belongs to a process that died (a crash, a kill -9, a lost host), and any
replica, at start-up and then every HOLD_RENEW_S, releases it. A replica never touches another live
replica's holds, so replicas sharing one Postgres can start and stop independently. Settling deletes the
hold row first: a hold is released once, however many paths try. The same upkeep sets a reserved_usd that
disagrees with its key's hold rows (left by a version without them) back to their sum.
The request rate is a sliding minute per key, per process.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import socket
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

from proxy.usage.store import Run, UsageStore

PREFIX = "sk-dlg-"
HOLD_RENEW_S = 10.0  # how often a live process renews its holds
HOLD_STALE_S = 60.0  # a hold not renewed for this long belongs to a process that is gone


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


@dataclass(frozen=True)
class Hold:
    """A reservation on a key's budget, until its request's real cost is known."""

    hold_id: str
    key_id: str
    amount: float


_COLUMNS = "key_id, name, aliases, budget_usd, spent_usd, reserved_usd, rpm, created_at, expires_at, revoked_at"


def _issued(row: tuple[Any, ...]) -> IssuedKey:
    aliases = json.loads(row[2]) if row[2] is not None else None
    return IssuedKey(row[0], row[1], tuple(aliases) if aliases is not None else None, *row[3:])


class KeyStore:
    def __init__(self, store: UsageStore, owner: str | None = None) -> None:
        self.db = store.db
        # who holds what this store reserves: unique per instance, readable by whoever finds a hold left over
        self.owner = owner or f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"

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

    def presence(self) -> tuple[bool, bool]:
        """(whether any key was ever issued, whether any is active now), in one query."""
        rows = self.db.execute("SELECT EXISTS (SELECT 1 FROM keys), EXISTS (SELECT 1 FROM keys WHERE revoked_at IS NULL "
                               "AND (expires_at IS NULL OR expires_at > ?))", (time.time(),))
        return bool(rows[0][0]), bool(rows[0][1])

    def revoke(self, kid: str) -> bool:
        return bool(self.db.execute("UPDATE keys SET revoked_at = ? WHERE key_id = ? AND revoked_at IS NULL RETURNING key_id",
                                    (time.time(), kid)))

    def reserve(self, kid: str, amount: float) -> Hold | None:
        """Hold `amount` of the key's budget; None when spent + held + amount would pass the budget."""
        hold = Hold(f"hold_{secrets.token_hex(12)}", kid, amount)

        def work(run: Run) -> Hold | None:
            if not run("UPDATE keys SET reserved_usd = reserved_usd + ? WHERE key_id = ? AND "
                       "(budget_usd IS NULL OR spent_usd + reserved_usd + ? <= budget_usd) RETURNING key_id",
                       (amount, kid, amount)):
                return None
            now = time.time()
            run("INSERT INTO holds (hold_id, key_id, amount, owner, created_at, renewed_at) VALUES (?, ?, ?, ?, ?, ?)",
                (hold.hold_id, kid, amount, self.owner, now, now))
            return hold

        return self.db.transaction(work)

    def settle(self, hold: Hold, actual: float) -> None:
        """Swap a hold for what the request really cost (0 releases it). A hold already released as stale is
        only charged: what was delivered is spent either way."""
        def work(run: Run) -> None:
            freed = run("DELETE FROM holds WHERE hold_id = ? RETURNING amount", (hold.hold_id,))
            held = float(freed[0][0]) if freed else 0.0
            run("UPDATE keys SET reserved_usd = CASE WHEN reserved_usd > ? THEN reserved_usd - ? ELSE 0 END, "
                "spent_usd = spent_usd + ? WHERE key_id = ?", (held, held, actual, hold.key_id))

        self.db.transaction(work)

    def holds(self, owner: str | None = None) -> list[Hold]:
        sql, params = "SELECT hold_id, key_id, amount FROM holds", []
        if owner is not None:
            sql, params = sql + " WHERE owner = ?", [owner]
        return [Hold(*r) for r in self.db.execute(sql + " ORDER BY created_at", params)]

    def renew(self) -> None:
        """Say that this store's holds are still in use (the live process calls it every HOLD_RENEW_S)."""
        self.db.execute("UPDATE holds SET renewed_at = ? WHERE owner = ?", (time.time(), self.owner))

    def reclaim_stale(self, stale_s: float = HOLD_STALE_S) -> list[Hold]:
        """Release the holds of processes that stopped renewing them `stale_s` ago: they died holding them."""
        return self._release("renewed_at < ? AND owner <> ?", (time.time() - stale_s, self.owner))

    def reconcile(self) -> list[tuple[str, float, float]]:
        """Set each key's reserved_usd back to the sum of its hold rows where the two disagree: what a process
        that reserved without a hold row (one older than the holds table) left. Returns (key_id, was, now)."""
        drifted = self.db.execute(
            "SELECT key_id FROM keys WHERE ABS(reserved_usd - COALESCE((SELECT SUM(amount) FROM holds "
            "WHERE holds.key_id = keys.key_id), 0)) > 1e-9")
        fixed = []
        for (kid,) in drifted:
            def work(run: Run, kid: str = kid) -> tuple[str, float, float] | None:
                # the key's row lock first: a reserve, settle or release of this key waits, or has committed
                locked = run(f"SELECT reserved_usd FROM keys WHERE key_id = ?{self.db.for_update}", (kid,))
                held = run("SELECT COALESCE(SUM(amount), 0) FROM holds WHERE key_id = ?", (kid,))
                if not locked or abs(float(locked[0][0]) - float(held[0][0])) <= 1e-9:
                    return None
                run("UPDATE keys SET reserved_usd = ? WHERE key_id = ?", (float(held[0][0]), kid))
                return kid, float(locked[0][0]), float(held[0][0])

            if (change := self.db.transaction(work)) is not None:
                fixed.append(change)
        return fixed

    def release_own(self) -> list[Hold]:
        """At shutdown, after every request is settled: release whatever this store still holds."""
        return self._release("owner = ?", (self.owner,))

    def _release(self, where: str, params: tuple[Any, ...]) -> list[Hold]:
        def work(run: Run) -> list[Hold]:
            gone = [Hold(*r) for r in run(f"DELETE FROM holds WHERE {where} RETURNING hold_id, key_id, amount", params)]
            for hold in gone:
                run("UPDATE keys SET reserved_usd = CASE WHEN reserved_usd > ? THEN reserved_usd - ? ELSE 0 END "
                    "WHERE key_id = ?", (hold.amount, hold.amount, hold.key_id))
            return gone

        return self.db.transaction(work)


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
