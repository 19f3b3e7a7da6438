"""The usage store: one row per request, in SQLite by default or Postgres when scaled out.

SQLite lives in one file under the data directory (`DELEGATE_HOME`, default ~/.delegate), in WAL mode
so reports can read while the proxy writes. `DELEGATE_DATABASE_URL=postgresql://...` selects Postgres.
Both get their schema from the same numbered migrations (as simonw/llm's migrations.py), and every
statement is parameterized. `request_id` is the primary key and rows are inserted with ON CONFLICT DO
NOTHING, so a write that is retried never makes a second row.

This module is imported by client-side tools (the report): it must not import litellm.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")
Run = Callable[[str, Iterable[Any]], list[tuple[Any, ...]]]  # one statement inside a transaction

COLUMNS = (
    "request_id", "created_at", "alias", "endpoint", "stream", "status", "served_by", "model", "backend", "device",
    "attempts", "fallbacks", "prompt_tokens", "completion_tokens", "latency_s", "ttft_s", "decode_tps",
    "generation_s", "error_class", "error", "key_id", "reference_model", "reference_cost", "local_cost", "saved",
    "source",  # m004
    "requested_model", "cache_creation_tokens", "cache_read_tokens",  # m005
    "verdict", "escalations", "checks",  # m006
)
PASSTHROUGH = "anthropic"  # served_by of a request Anthropic served: passed through (proxy/server/passthrough.py)


def delegate_home() -> Path:
    return Path(os.environ.get("DELEGATE_HOME") or Path.home() / ".delegate")


class StoreError(Exception):
    """The store cannot be opened or written."""


# --- migrations: append, never edit ----------------------------------------------------------------------

def m001_usage(db: Database) -> None:
    real = db.real
    db.execute(f"""
        CREATE TABLE usage (
            request_id TEXT PRIMARY KEY,
            created_at {real} NOT NULL,
            alias TEXT NOT NULL,
            endpoint TEXT NOT NULL,
            stream INTEGER NOT NULL,
            status TEXT NOT NULL,
            served_by TEXT,
            model TEXT,
            backend TEXT,
            device TEXT,
            attempts TEXT NOT NULL,
            fallbacks INTEGER NOT NULL,
            prompt_tokens INTEGER NOT NULL,
            completion_tokens INTEGER NOT NULL,
            latency_s {real} NOT NULL,
            ttft_s {real},
            decode_tps {real},
            generation_s {real} NOT NULL,
            error_class TEXT,
            error TEXT,
            key_id TEXT,
            reference_model TEXT NOT NULL,
            reference_cost {real} NOT NULL,
            local_cost {real} NOT NULL,
            saved {real} NOT NULL
        )""")
    db.execute("CREATE INDEX usage_created_at ON usage (created_at)")
    db.execute("CREATE INDEX usage_key_id ON usage (key_id)")


def m002_keys(db: Database) -> None:
    real = db.real
    db.execute(f"""
        CREATE TABLE keys (
            key_id TEXT PRIMARY KEY,
            key_hash TEXT NOT NULL UNIQUE,
            name TEXT,
            aliases TEXT,
            budget_usd {real},
            spent_usd {real} NOT NULL DEFAULT 0,
            reserved_usd {real} NOT NULL DEFAULT 0,
            rpm INTEGER,
            created_at {real} NOT NULL,
            expires_at {real},
            revoked_at {real}
        )""")


def m003_holds(db: Database) -> None:
    """One row per budget hold, so a hold outlives neither its request nor its process (proxy/usage/keys.py)."""
    real = db.real
    db.execute(f"""
        CREATE TABLE holds (
            hold_id TEXT PRIMARY KEY,
            key_id TEXT NOT NULL,
            amount {real} NOT NULL,
            owner TEXT NOT NULL,
            created_at {real} NOT NULL,
            renewed_at {real} NOT NULL
        )""")
    db.execute("CREATE INDEX holds_renewed_at ON holds (renewed_at)")
    db.execute("CREATE INDEX holds_owner ON holds (owner)")
    db.execute("CREATE INDEX holds_key_id ON holds (key_id)")


def m004_source(db: Database) -> None:
    """Where each request came from (api, cli, mcp, messages, review); rows from before say nothing (api)."""
    db.execute("ALTER TABLE usage ADD COLUMN source TEXT")


def m005_messages(db: Database) -> None:
    """Anthropic's Messages API: the model the client asked for (a Claude model, whose tier the report groups by,
    or an alias), and for a request passed through to Anthropic the input tokens it wrote to and read from
    Anthropic's prompt cache (counted in prompt_tokens too, priced at their own rates)."""
    db.execute("ALTER TABLE usage ADD COLUMN requested_model TEXT")
    db.execute("ALTER TABLE usage ADD COLUMN cache_creation_tokens INTEGER")
    db.execute("ALTER TABLE usage ADD COLUMN cache_read_tokens INTEGER")


def m006_checks(db: Database) -> None:
    """Checked answers (proxy/routing/answer_checks.py): what the checks said of the answer the client got
    (passed, failed; NULL where its alias checks nothing), how often the request was sent on because an answer
    failed, and each judged answer with its verdict. Savings count only answers that did not fail."""
    db.execute("ALTER TABLE usage ADD COLUMN verdict TEXT")
    db.execute("ALTER TABLE usage ADD COLUMN escalations INTEGER")  # NULL in rows written before: none
    db.execute("ALTER TABLE usage ADD COLUMN checks TEXT")


MIGRATIONS: list[Callable[[Database], None]] = [m001_usage, m002_keys, m003_holds, m004_source, m005_messages,
                                                m006_checks]


# --- the two databases -----------------------------------------------------------------------------------

class Database:
    """The little that differs between SQLite and Postgres, behind one face. Placeholders are `?`."""

    real = "REAL"
    for_update = ""  # row locks inside a transaction (SQLite's BEGIN IMMEDIATE already locks the whole file)
    url: str

    def execute(self, sql: str, params: Iterable[Any] = ()) -> list[tuple[Any, ...]]:
        raise NotImplementedError

    def executemany(self, sql: str, rows: list[tuple[Any, ...]]) -> None:
        raise NotImplementedError

    def transaction(self, work: Callable[[Run], T]) -> T:
        """Run `work(run)` in one transaction: every statement it runs commits together, or none does."""
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError


class SQLiteDatabase(Database):
    def __init__(self, path: Path) -> None:
        self.url = f"sqlite:///{path}"
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            # a short busy timeout: a locked file is retried by the recorder, not waited on by a request
            self._conn = sqlite3.connect(path, timeout=1, check_same_thread=False, isolation_level=None)
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute("PRAGMA synchronous=NORMAL")
        except (OSError, sqlite3.Error) as e:
            raise StoreError(f"cannot open the usage store {path}: {e}") from e
        self._lock = threading.Lock()

    def execute(self, sql: str, params: Iterable[Any] = ()) -> list[tuple[Any, ...]]:
        with self._lock:
            return self._conn.execute(sql, tuple(params)).fetchall()

    def executemany(self, sql: str, rows: list[tuple[Any, ...]]) -> None:
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                self._conn.executemany(sql, rows)
                self._conn.execute("COMMIT")
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise

    def transaction(self, work: Callable[[Run], T]) -> T:
        def run(sql: str, params: Iterable[Any] = ()) -> list[tuple[Any, ...]]:
            return self._conn.execute(sql, tuple(params)).fetchall()

        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                result = work(run)
                self._conn.execute("COMMIT")
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            return result

    def close(self) -> None:
        self._conn.close()


class PostgresDatabase(Database):
    real = "DOUBLE PRECISION"
    for_update = " FOR UPDATE"

    def __init__(self, url: str) -> None:
        try:
            import psycopg
        except ImportError as e:
            raise StoreError("DELEGATE_DATABASE_URL points at Postgres but psycopg is not installed") from e
        self.url = url
        self._psycopg = psycopg
        self._lock = threading.Lock()
        try:
            self._conn = self._connect()
        except psycopg.Error as e:
            where = url.split("@")[-1].split("/")[0]
            raise StoreError(f"cannot connect to the Postgres usage store at {where} (DELEGATE_DATABASE_URL): "
                             f"{str(e).strip().splitlines()[0]}") from e

    def _connect(self) -> Any:
        return self._psycopg.connect(self.url, autocommit=True, connect_timeout=5)

    def _live(self) -> Any:
        """The connection, opened again if the server went away (a restart, a failover)."""
        if self._conn.closed or self._conn.broken:
            self._conn = self._connect()
        return self._conn

    @staticmethod
    def _sql(sql: str) -> str:
        return sql.replace("?", "%s")

    def execute(self, sql: str, params: Iterable[Any] = ()) -> list[tuple[Any, ...]]:
        with self._lock, self._live().cursor() as cur:
            cur.execute(self._sql(sql), tuple(params))
            return cur.fetchall() if cur.description else []

    def executemany(self, sql: str, rows: list[tuple[Any, ...]]) -> None:
        with self._lock:
            conn = self._live()
            with conn.transaction(), conn.cursor() as cur:
                cur.executemany(self._sql(sql), rows)

    def transaction(self, work: Callable[[Run], T]) -> T:
        with self._lock:
            conn = self._live()
            with conn.transaction(), conn.cursor() as cur:
                def run(sql: str, params: Iterable[Any] = ()) -> list[tuple[Any, ...]]:
                    cur.execute(self._sql(sql), tuple(params))
                    return cur.fetchall() if cur.description else []

                return work(run)

    def close(self) -> None:
        self._conn.close()


def connect(url: str | None = None) -> Database:
    url = url if url is not None else os.environ.get("DELEGATE_DATABASE_URL")
    if url and url.startswith(("postgresql://", "postgres://")):
        return PostgresDatabase(url)
    if url and url.startswith("sqlite:///"):
        return SQLiteDatabase(Path(url.removeprefix("sqlite:///")))
    if url:
        raise StoreError(f"DELEGATE_DATABASE_URL must start with postgresql:// or sqlite:///, not {url.split(':')[0]}:")
    return SQLiteDatabase(delegate_home() / "usage.db")


def migrate(db: Database) -> int:
    """Apply the migrations this database has not seen; returns its schema version."""
    db.execute("CREATE TABLE IF NOT EXISTS _migrations (version INTEGER PRIMARY KEY, name TEXT NOT NULL)")
    done = {row[0] for row in db.execute("SELECT version FROM _migrations")}
    for version, step in enumerate(MIGRATIONS, start=1):
        if version not in done:
            step(db)
            db.execute("INSERT INTO _migrations (version, name) VALUES (?, ?)", (version, step.__name__))
    return len(MIGRATIONS)


# --- the store -------------------------------------------------------------------------------------------

class UsageStore:
    def __init__(self, db: Database) -> None:
        self.db = db
        migrate(db)

    @classmethod
    def open(cls, url: str | None = None) -> UsageStore:
        return cls(connect(url))

    def insert(self, rows: list[dict[str, Any]]) -> None:
        """Insert rows; a row whose request_id is already stored is left as it is."""
        placeholders = ", ".join("?" for _ in COLUMNS)
        sql = f"INSERT INTO usage ({', '.join(COLUMNS)}) VALUES ({placeholders}) ON CONFLICT (request_id) DO NOTHING"
        self.db.executemany(sql, [tuple(_encode(r.get(c)) for c in COLUMNS) for r in rows])

    def rows(self, since: float | None = None, until: float | None = None, request_id: str | None = None,
             key_id: str | None = None, limit: int | None = None, newest_first: bool = False) -> list[dict[str, Any]]:
        where, params = [], []
        for clause, value in (("created_at >= ?", since), ("created_at < ?", until), ("request_id = ?", request_id),
                              ("key_id = ?", key_id)):
            if value is not None:
                where.append(clause)
                params.append(value)
        sql = f"SELECT {', '.join(COLUMNS)} FROM usage"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY created_at " + ("DESC" if newest_first else "ASC")
        if limit is not None:
            sql += " LIMIT ?"
            params.append(int(limit))
        out = []
        for values in self.db.execute(sql, params):
            row = dict(zip(COLUMNS, values, strict=True))
            row["attempts"] = json.loads(row["attempts"] or "[]")
            row["checks"] = json.loads(row["checks"] or "[]")
            row["escalations"] = row["escalations"] or 0
            row["stream"] = bool(row["stream"])
            out.append(row)
        return out

    def count(self) -> int:
        return int(self.db.execute("SELECT COUNT(*) FROM usage")[0][0])

    def check_writable(self) -> None:
        """Raise if a write would fail now (a read-only file, a locked database, a lost connection)."""
        self.db.execute("CREATE TABLE IF NOT EXISTS _writable (x INTEGER)")
        self.db.execute("DELETE FROM _writable")

    def close(self) -> None:
        self.db.close()


def _encode(value: Any) -> Any:
    if isinstance(value, list | dict):
        return json.dumps(value)
    if isinstance(value, bool):
        return int(value)
    return value
