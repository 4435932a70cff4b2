"""The ledger's system of record: one SQL table of settled requests keyed by the Redis stream entry id (`ledger_id`),
so that an export retried after a crash inserts nothing twice. SQLite (embedded, the local default) and PostgreSQL
(production) behind one interface; money and tokens are BIGINT, never floats.

A relative SQLite path is resolved against the directory given to `LedgerConfig.resolved(base)` or
`Database.open(config, base)`, else against the current directory: the caller that knows the repository root (the
config layer, the CLI) passes it; this package imports nothing from `serve_app.config`."""

from __future__ import annotations

import json
import re
import sqlite3
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence
from urllib.parse import parse_qs, urlsplit

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from serve_app.money import ledger as stream_ledger
from serve_app.money.status import Status

SQLITE_PREFIX = "sqlite:///"
POSTGRES_SCHEMES = ("postgresql", "postgres")
BIGINT = 2**63  # PostgreSQL's BIGINT and SQLite's INTEGER are signed 64-bit
INTEGER = re.compile(r"-?[0-9]+")

# The row's columns, as the settlement script writes them (`money/lua.py` LEDGER_FIELDS; a unit test keeps the two
# equal). A field the script gains later lands in the `extra` JSON column until a column is added, never lost.
INTEGER_COLUMNS = ("prompt_tokens", "completion_tokens", "cost_micros", "created_ms", "settled_ms")
COLUMNS = ("request_id", "completion_id", "account", "key_id", "model", "prompt_tokens", "completion_tokens",
           "cost_micros", "status", "created_ms", "settled_ms")
STORED = ("row_key", "ledger_id", "stream_ms", "stream_seq", *COLUMNS, "extra")

SCHEMA = (
    # `row_key` (the completion id; `:expired` for a reconciliation's row, the only second row a completion can have)
    # makes the export idempotent, and stays unique where stream ids do not: across Redis instances, or after a
    # failover to a replica that had not seen the last entries.
    "CREATE TABLE IF NOT EXISTS ledger (row_key TEXT PRIMARY KEY, ledger_id TEXT NOT NULL, stream_ms BIGINT NOT NULL, "
    "stream_seq BIGINT NOT NULL, "
    + ", ".join(f"{c} {'BIGINT' if c in INTEGER_COLUMNS else 'TEXT'} NOT NULL" for c in COLUMNS)
    + ", extra TEXT)",
    "CREATE INDEX IF NOT EXISTS ledger_account_settled ON ledger (account, settled_ms)",
    # Stream entries that could not be read as a row: kept whole (JSON) for the operator, out of the export's way.
    "CREATE TABLE IF NOT EXISTS ledger_rejects (ledger_id TEXT PRIMARY KEY, fields TEXT NOT NULL, "
    "reason TEXT NOT NULL, rejected_ms BIGINT NOT NULL)",
)


class LedgerConfig(BaseModel):
    """Where the ledger is kept and how the exporter moves it there."""

    model_config = ConfigDict(extra="forbid", hide_input_in_errors=True)  # a URL with a password is never echoed
    # `sqlite:///relative/path`, `sqlite:////absolute/path`, or `postgresql://user@host:port/dbname`.
    database: str = SQLITE_PREFIX + ".run/ledger.sqlite3"
    password_file: Path | None = None  # PostgreSQL's password, read from this file; never in the URL, env or argv
    batch: int = Field(500, ge=1, le=5000)  # stream entries per read and per database transaction
    retain_rows: int = Field(10_000, ge=0)  # exported rows kept in the stream, so recent rows stay readable there
    block_ms: int = Field(1000, ge=0, le=4000)  # a read waits this long for new rows (under the client's 5 s timeout)
    # After a batch smaller than `batch`, the next read waits this long, so that under load each read, transaction and
    # trim carries many rows instead of one or two (about 10 Redis calls and a commit per batch); rows wait at most
    # this much longer in Redis, where they are already durable.
    linger_ms: int = Field(200, ge=0, le=2000)
    claim_idle_ms: int = Field(30_000, ge=0)  # a dead consumer's entries pending this long are taken over

    @field_validator("database")
    @classmethod
    def _known_database(cls, url: str) -> str:
        if url.startswith(SQLITE_PREFIX):
            if not url[len(SQLITE_PREFIX):]:
                raise ValueError("a SQLite ledger needs a path: sqlite:///relative/path or sqlite:////absolute/path")
            return url
        parts = urlsplit(url)
        if parts.scheme not in POSTGRES_SCHEMES:
            raise ValueError("the ledger database must be sqlite:///<path> or postgresql://user@host:port/dbname")
        if parts.password is not None or "password" in parse_qs(parts.query):
            raise ValueError("the ledger database URL contains a password: put it in password_file instead")
        return url

    @model_validator(mode="after")
    def _password_only_for_postgres(self) -> LedgerConfig:
        if self.password_file is not None and self.kind == "sqlite":
            raise ValueError("password_file applies to a PostgreSQL ledger only")
        return self

    @property
    def kind(self) -> str:
        return "sqlite" if self.database.startswith(SQLITE_PREFIX) else "postgresql"

    def sqlite_path(self, base: Path | None = None) -> Path:
        path = Path(self.database[len(SQLITE_PREFIX):])
        return path if path.is_absolute() else (base or Path.cwd()) / path

    def resolved(self, base: Path) -> LedgerConfig:
        """The same config with a relative SQLite path made absolute against `base` (for a replica whose working
        directory is not the repository's)."""
        if self.kind != "sqlite":
            return self
        return self.model_copy(update={"database": SQLITE_PREFIX + str(self.sqlite_path(base))})


class MalformedRow(ValueError):
    """A stream entry that is not a ledger row: set aside, never inserted."""


@dataclass(frozen=True)
class Reject:
    ledger_id: str
    fields: dict
    reason: str


def parse_entry(entry_id: str, fields: dict) -> dict:
    """A stream entry as a row to insert: integers parsed, nothing else computed. Raises MalformedRow."""
    if not fields:
        raise MalformedRow("the entry was deleted from the stream before it was exported")
    row: dict[str, Any] = {"ledger_id": entry_id}
    try:
        ms, seq = entry_id.split("-")
        row["stream_ms"], row["stream_seq"] = _integer(ms, "stream id"), _integer(seq, "stream id")
        for column in COLUMNS:
            if column not in fields:
                raise MalformedRow(f"field {column} is missing")
            value = fields[column]
            if "\x00" in value:
                raise MalformedRow(f"field {column} contains a NUL character")
            row[column] = _integer(value, column) if column in INTEGER_COLUMNS else value
    except (AttributeError, TypeError, ValueError) as e:
        raise MalformedRow(str(e)) from None
    row["row_key"] = row_key(row["completion_id"], row["status"])
    extra = {k: v for k, v in fields.items() if k not in COLUMNS}
    row["extra"] = json.dumps(extra, sort_keys=True) if extra else None
    return row


def row_key(completion_id: str, status: str) -> str:
    """One settlement per completion, plus the row of a reconciliation as expired before a late settlement."""
    return completion_id + (":expired" if status == Status.EXPIRED.value else "")


def _integer(value: str, name: str) -> int:
    if not INTEGER.fullmatch(value):
        raise MalformedRow(f"field {name} is not an integer")
    number = int(value)
    if not -BIGINT <= number < BIGINT:
        raise MalformedRow(f"field {name} is out of the 64-bit range")
    return number


class Database:
    """The ledger table, through one connection used by one thread at a time. A connection is opened (and the schema
    created) on first use, and opened again after a failure that broke it, so a database that is down when the
    exporter starts or restarts under it only delays the export."""

    param = "?"
    schema_lock: tuple[str, ...] = ()  # what makes two processes creating the schema at once wait for each other

    def __init__(self, config: LedgerConfig, base: Path | None = None):
        self.config = config
        self.base = base
        self._connection: Any = None

    @staticmethod
    def open(config: LedgerConfig, base: Path | None = None) -> Database:
        cls = SqliteDatabase if config.kind == "sqlite" else PostgresDatabase
        return cls(config, base)

    # -- the backend's part --
    def _connect(self) -> Any:
        raise NotImplementedError

    def _begin(self, cursor: Any, write: bool) -> None:
        pass

    def _discard_if_broken(self) -> None:
        pass

    # -- the shared part --
    def _conn(self) -> Any:
        if self._connection is None:
            conn = self._connect()
            try:
                cur = conn.cursor()
                self._begin(cur, write=True)
                for statement in self.schema_lock + SCHEMA:
                    cur.execute(statement)
                conn.commit()
            except BaseException:
                conn.close()
                raise
            self._connection = conn
        return self._connection

    @contextmanager
    def _transaction(self, write: bool) -> Iterator[Any]:
        conn = self._conn()
        cur = conn.cursor()
        try:
            self._begin(cur, write)
            yield cur
            conn.commit()
        except BaseException:
            try:
                conn.rollback()
            except Exception:
                pass
            self._discard_if_broken()
            raise
        finally:
            try:
                cur.close()
            except Exception:
                pass

    def insert(self, rows: Sequence[dict], rejects: Sequence[Reject] = ()) -> int:
        """Rows (from `parse_entry`) and set-aside entries in one transaction; a row whose `row_key` is already
        stored is left as it is. Returns how many rows were new."""
        p = self.param
        row_sql = (f"INSERT INTO ledger ({', '.join(STORED)}) VALUES ({', '.join([p] * len(STORED))}) "
                   "ON CONFLICT (row_key) DO NOTHING")
        reject_sql = (f"INSERT INTO ledger_rejects (ledger_id, fields, reason, rejected_ms) "
                      f"VALUES ({p}, {p}, {p}, {p}) ON CONFLICT (ledger_id) DO NOTHING")
        now = int(time.time() * 1000)
        inserted = 0
        with self._transaction(write=True) as cur:
            if rows:  # rowcount sums the statements' on both drivers (psycopg since 3.1): 0 for a known ledger_id
                cur.executemany(row_sql, [[row[c] for c in STORED] for row in rows])
                inserted = max(cur.rowcount, 0)
            if rejects:
                cur.executemany(reject_sql, [(x.ledger_id, json.dumps(x.fields, sort_keys=True), x.reason, now)
                                             for x in rejects])
        return inserted

    def rows(self, account: str, since_ms: int | None = None) -> list[dict]:
        """The account's rows settled at or after `since_ms`, oldest first, in the shape of `money.ledger.row`."""
        p = self.param
        sql = f"SELECT {', '.join(('ledger_id', *COLUMNS))} FROM ledger WHERE account = {p}"
        args: list[Any] = [account]
        if since_ms is not None:
            sql += f" AND settled_ms >= {p}"
            args.append(since_ms)
        sql += " ORDER BY settled_ms, stream_ms, stream_seq"
        with self._transaction(write=False) as cur:
            cur.execute(sql, args)
            records = cur.fetchall()
        return [stream_ledger.row(r[0], dict(zip(COLUMNS, r[1:]))) for r in records]

    def query(self, sql: str, args: Sequence[Any] = ()) -> list[tuple]:
        """A read-only query (the reports in `ledger/reports.py`)."""
        with self._transaction(write=False) as cur:
            cur.execute(sql, args)
            return cur.fetchall()

    def total_micros(self, account: str) -> int:
        with self._transaction(write=False) as cur:
            cur.execute(f"SELECT COALESCE(SUM(cost_micros), 0) FROM ledger WHERE account = {self.param}", (account,))
            return int(cur.fetchone()[0])

    def count(self) -> int:
        with self._transaction(write=False) as cur:
            cur.execute("SELECT COUNT(*) FROM ledger")
            return int(cur.fetchone()[0])

    def rejects(self) -> list[dict]:
        """The set-aside entries, oldest first: `ledger_id`, `fields` (as they were in the stream), `reason`."""
        with self._transaction(write=False) as cur:
            cur.execute("SELECT ledger_id, fields, reason FROM ledger_rejects ORDER BY rejected_ms, ledger_id")
            return [{"ledger_id": i, "fields": json.loads(f), "reason": why} for i, f, why in cur.fetchall()]

    def close(self) -> None:
        if self._connection is not None:
            connection, self._connection = self._connection, None
            try:
                connection.close()
            except Exception:
                pass


class SqliteDatabase(Database):
    """Embedded: WAL (readers do not block the exporter), `synchronous=FULL` (a committed row survives a power cut),
    a busy timeout (the CLI and the exporter share the file)."""

    def _connect(self) -> sqlite3.Connection:
        path = self.config.sqlite_path(self.base)
        path.parent.mkdir(parents=True, exist_ok=True)
        # Transactions are explicit (`_begin`); the connection may move to the exporter's thread, used by one at a time.
        conn = sqlite3.connect(path, timeout=10, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute("PRAGMA busy_timeout=10000")
        return conn

    def _begin(self, cursor: sqlite3.Cursor, write: bool) -> None:
        cursor.execute("BEGIN IMMEDIATE" if write else "BEGIN")


class PostgresDatabase(Database):
    """psycopg 3; the password comes from `password_file` as a connect argument, never from the URL."""

    param = "%s"
    # `CREATE ... IF NOT EXISTS` is not safe against a concurrent one in PostgreSQL (the CLI and the exporter).
    schema_lock = ("SELECT pg_advisory_xact_lock(7290104211)",)

    def _connect(self) -> Any:
        import psycopg

        kwargs: dict[str, Any] = {"connect_timeout": 5, "application_name": "qbt-ledger"}
        if self.config.password_file is not None:
            try:
                kwargs["password"] = self.config.password_file.read_text().rstrip("\r\n")
            except OSError as e:
                raise RuntimeError(f"cannot read the ledger's password_file {self.config.password_file}: "
                                   f"{e.strerror}") from None
        return psycopg.connect(self.config.database, **kwargs)

    def _discard_if_broken(self) -> None:
        conn = self._connection
        if conn is not None and (conn.closed or conn.broken):
            self.close()
