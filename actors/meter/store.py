"""The tenant plane's database: SQLite (WAL) by default, PostgreSQL by URL.

    Store.open("/var/lib/ziggurat/tenancy.db")      # SQLite, WAL, fsync on commit
    Store.open("postgresql://user@host/db")          # psycopg 3

SQL is written once with `?` placeholders and portable syntax
(`INSERT ... ON CONFLICT DO NOTHING` works in both). Every write commits
before it returns: a caller that got an answer has a durable row.
"""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

SCHEMA = [
    """CREATE TABLE IF NOT EXISTS usage_events (
        request_id TEXT PRIMARY KEY,
        http_request_id TEXT,
        tenant TEXT NOT NULL,
        key_id TEXT,
        model TEXT NOT NULL,
        lora TEXT,
        replica INTEGER,
        gpu_type TEXT,
        prompt_tokens INTEGER NOT NULL,
        cached_tokens INTEGER NOT NULL,
        completion_tokens INTEGER NOT NULL,
        status TEXT NOT NULL,
        arrived_at DOUBLE PRECISION NOT NULL,
        finished_at DOUBLE PRECISION NOT NULL,
        ttft_ms DOUBLE PRECISION,
        duration_ms DOUBLE PRECISION NOT NULL,
        prefill_replica INTEGER
    )""",
    "CREATE INDEX IF NOT EXISTS usage_tenant_time ON usage_events (tenant, finished_at)",
    """CREATE TABLE IF NOT EXISTS tenants (
        tenant_id TEXT PRIMARY KEY,
        name TEXT NOT NULL UNIQUE,
        created_at DOUBLE PRECISION NOT NULL,
        requests_per_minute INTEGER,
        tokens_per_minute INTEGER,
        monthly_token_cap BIGINT,
        monthly_spend_cap DOUBLE PRECISION,
        log_requests INTEGER NOT NULL DEFAULT 0,
        log_retention_days INTEGER NOT NULL DEFAULT 30
    )""",
    """CREATE TABLE IF NOT EXISTS api_keys (
        key_id TEXT PRIMARY KEY,
        tenant_id TEXT NOT NULL,
        salt TEXT NOT NULL,
        key_hash TEXT NOT NULL,
        created_at DOUBLE PRECISION NOT NULL,
        expires_at DOUBLE PRECISION,
        revoked_at DOUBLE PRECISION,
        models TEXT,
        requests_per_minute INTEGER,
        tokens_per_minute INTEGER
    )""",
    """CREATE TABLE IF NOT EXISTS prices (
        model TEXT PRIMARY KEY,
        input_per_mtok DOUBLE PRECISION NOT NULL,
        cached_input_per_mtok DOUBLE PRECISION NOT NULL,
        output_per_mtok DOUBLE PRECISION NOT NULL,
        updated_at DOUBLE PRECISION NOT NULL
    )""",
    """CREATE TABLE IF NOT EXISTS request_logs (
        request_id TEXT PRIMARY KEY,
        tenant TEXT NOT NULL,
        created_at DOUBLE PRECISION NOT NULL,
        request TEXT NOT NULL,
        response TEXT NOT NULL
    )""",
    "CREATE INDEX IF NOT EXISTS request_logs_tenant ON request_logs (tenant, created_at)",
]


class StoreError(RuntimeError):
    pass


class Store:
    """A thread-safe connection with `execute`, `query` and `executemany`."""

    def __init__(self, conn, kind: str, url: str):
        self.conn, self.kind, self.url = conn, kind, url
        self.lock = threading.Lock()
        for stmt in SCHEMA:
            self.execute(stmt)
        self._migrate()

    # Columns added since the first schema: (table, column, type). A ledger made by
    # an earlier version gets them on open.
    ADDED = [("usage_events", "prefill_replica", "INTEGER")]

    def _migrate(self) -> None:
        for table, column, kind in self.ADDED:
            if self.kind == "sqlite":
                have = {r[1] for r in self.query(f"PRAGMA table_info({table})")}
            else:
                have = {r[0] for r in self.query(
                    "SELECT column_name FROM information_schema.columns WHERE table_name = ?", (table,))}
            if column not in have:
                self.execute(f"ALTER TABLE {table} ADD COLUMN {column} {kind}")

    @staticmethod
    def open(url: str | Path) -> "Store":
        url = str(url)
        if url.startswith(("postgresql://", "postgres://")):
            try:
                import psycopg
            except ImportError:
                raise StoreError("a PostgreSQL ledger needs psycopg: pip install 'ziggurat[postgres]'") from None
            try:
                conn = psycopg.connect(url, autocommit=False)
            except Exception as e:
                raise StoreError(f"cannot connect to the PostgreSQL ledger: {e}") from None
            return Store(conn, "postgres", url)
        path = Path(url.removeprefix("sqlite:///"))
        path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(str(path), check_same_thread=False, timeout=30, isolation_level=None)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")  # a committed event survives power loss
        return Store(conn, "sqlite", str(path))

    def _sql(self, sql: str) -> str:
        return sql.replace("?", "%s") if self.kind == "postgres" else sql

    def execute(self, sql: str, params: tuple = ()) -> int:
        with self.lock:
            return self._write(lambda cur: cur.execute(self._sql(sql), params))

    def executemany(self, sql: str, rows: list[tuple]) -> int:
        """All rows in one transaction; returns rows affected."""
        if not rows:
            return 0
        with self.lock:
            return self._write(lambda cur: cur.executemany(self._sql(sql), rows))

    def _write(self, fn) -> int:
        cur = self.conn.cursor()
        try:
            if self.kind == "sqlite":
                cur.execute("BEGIN IMMEDIATE")
            before = self.conn.total_changes if self.kind == "sqlite" else 0
            fn(cur)
            n = self.conn.total_changes - before if self.kind == "sqlite" else max(cur.rowcount, 0)
            self.conn.commit() if self.kind == "postgres" else cur.execute("COMMIT")
            return n
        except BaseException:
            try:
                self.conn.rollback() if self.kind == "postgres" else cur.execute("ROLLBACK")
            except Exception:
                pass
            raise
        finally:
            cur.close()

    def query(self, sql: str, params: tuple = ()) -> list[tuple]:
        with self.lock:
            cur = self.conn.cursor()
            try:
                cur.execute(self._sql(sql), params)
                rows = cur.fetchall()
                if self.kind == "postgres":
                    self.conn.commit()  # end the read transaction
                return [tuple(r) for r in rows]
            except BaseException:
                if self.kind == "postgres":
                    self.conn.rollback()  # else the connection stays in a failed transaction
                raise
            finally:
                cur.close()

    def close(self) -> None:
        with self.lock:
            self.conn.close()
