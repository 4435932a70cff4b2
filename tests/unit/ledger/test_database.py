"""The ledger database on SQLite: the schema follows the settlement script's row, an insert is idempotent by ledger
id and atomic, money stays exact integers, rows read back in the shape the stream reader gives, and the config
refuses what it must."""

from __future__ import annotations

import uuid

import sqlite3
import threading
import time

import pytest
from pydantic import ValidationError

from serve_app.ledger.database import COLUMNS, Database, LedgerConfig, MalformedRow, Reject, parse_entry
from serve_app.money import ledger, lua

BIG = 2**62 + 1  # beyond a float's exact integers


def fields(account: str = "acme", cost: int = 1500, settled: int = 1_767_225_600_000, **more) -> dict:
    """A stream entry's fields as the settlement script writes them (all strings), for a new completion."""
    f = {"request_id": "req-1", "completion_id": "cmpl-" + uuid.uuid4().hex, "account": account, "key_id": "k1", "model": "qbt-dev-llm",
         "prompt_tokens": "6", "completion_tokens": "3", "cost_micros": str(cost), "status": "ok",
         "created_ms": str(settled - 250), "settled_ms": str(settled)}
    f.update(more)
    return f


@pytest.fixture
def db(tmp_path):
    database = Database.open(LedgerConfig(database=f"sqlite:///{tmp_path}/ledger.sqlite3"))
    yield database
    database.close()


def test_columns_are_the_settlement_scripts_fields():
    assert COLUMNS == lua.LEDGER_FIELDS


def test_sqlite_is_durable_and_concurrent(db):
    db.count()
    conn = db._connection
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    assert conn.execute("PRAGMA busy_timeout").fetchone()[0] >= 1000
    types = {name: kind for _, name, kind, *_ in conn.execute("PRAGMA table_info(ledger)")}
    assert types["cost_micros"] == types["prompt_tokens"] == types["settled_ms"] == "BIGINT"
    assert "ledger_account_settled" in [r[1] for r in conn.execute("PRAGMA index_list(ledger)")]


def test_insert_is_idempotent_by_completion_not_by_stream_id(db):
    a, b = fields(), fields(cost=7)
    rows = [parse_entry("1767225600000-0", a), parse_entry("1767225600000-1", b)]
    assert db.insert(rows) == 2
    assert db.insert(rows) == 0
    assert db.insert([parse_entry("1767225600000-1", b), parse_entry("1767225600001-0", fields())]) == 1
    # Another Redis (a failover, a fresh dev Redis) reuses a stream id for a different completion: both are kept.
    assert db.insert([parse_entry("1767225600000-0", fields(cost=11))]) == 1
    # A reconciliation's `expired` row and the late settlement after it are two rows of one completion.
    late = fields(cost=5)
    assert db.insert([parse_entry("1767225600002-0", dict(late, status="expired", cost_micros="0")),
                      parse_entry("1767225600003-0", late)]) == 2
    assert db.count() == 6
    assert db.total_micros("acme") == 1500 + 7 + 1500 + 11 + 0 + 5


def test_insert_is_one_transaction(db):
    good = parse_entry("1767225600000-0", fields())
    broken = {k: v for k, v in parse_entry("1767225600000-1", fields()).items() if k != "model"}
    with pytest.raises(KeyError):
        db.insert([good, broken])
    assert db.count() == 0  # the first row went back with the failure
    assert db.insert([good]) == 1


def test_money_is_exact_integers(db):
    db.insert([parse_entry("1767225600000-0", fields(cost=BIG)), parse_entry("1767225600000-1", fields(cost=1))])
    assert db.total_micros("acme") == BIG + 1
    assert [r["cost_micros"] for r in db.rows("acme")] == [BIG, 1]
    assert db.rows("acme")[0]["cost_usd"] == "4611686018427.387905"
    assert db.total_micros("nobody") == 0


def test_rows_have_the_stream_readers_shape_oldest_first(db):
    later, earlier = fields(settled=1_767_225_700_000, request_id="req-2"), fields(settled=1_767_225_600_000)
    db.insert([parse_entry("1767225700000-0", later), parse_entry("1767225600000-10", earlier),
               parse_entry("1767225600000-9", earlier | {"request_id": "req-0", "completion_id": "cmpl-0"}),
               parse_entry("1767225600000-11", fields(account="other"))])
    rows = db.rows("acme")
    assert rows == [ledger.row("1767225600000-9", earlier | {"request_id": "req-0", "completion_id": "cmpl-0"}),
                    ledger.row("1767225600000-10", earlier), ledger.row("1767225700000-0", later)]
    assert rows[0]["settled_at"] == "2026-01-01T00:00:00.000+00:00"
    assert [r["request_id"] for r in db.rows("acme", since_ms=1_767_225_600_001)] == ["req-2"]


def test_rows_survive_reopening(db, tmp_path):
    db.insert([parse_entry("1767225600000-0", fields())])
    db.close()
    again = Database.open(LedgerConfig(database=f"sqlite:///{tmp_path}/ledger.sqlite3"))
    assert again.count() == 1
    again.close()


def test_unknown_fields_are_kept_not_lost(db):
    row = parse_entry("1767225600000-0", fields(late="1"))
    assert row["extra"] == '{"late": "1"}'
    db.insert([row])
    assert db._connection.execute("SELECT extra FROM ledger").fetchone()[0] == '{"late": "1"}'


@pytest.mark.parametrize("entry_id, f, reason", [
    ("1767225600000-0", {k: v for k, v in fields().items() if k != "cost_micros"}, "cost_micros is missing"),
    ("1767225600000-0", fields(cost_micros="1.5"), "cost_micros is not an integer"),
    ("1767225600000-0", fields(prompt_tokens=" 6"), "prompt_tokens is not an integer"),
    ("1767225600000-0", fields(prompt_tokens="\u0666"), "prompt_tokens is not an integer"),  # an Arabic-Indic 6
    ("1767225600000-0", fields(cost=2**63), "cost_micros is out of the 64-bit range"),
    ("1767225600000-0", fields(model="a\x00b"), "model contains a NUL"),
    ("1767225600000", fields(), "not enough values"),
    ("1767225600000-0", {}, "deleted from the stream"),
])
def test_malformed_entries_are_refused(entry_id, f, reason):
    with pytest.raises(MalformedRow, match=reason):
        parse_entry(entry_id, f)


def test_rejects_are_kept_once(db):
    bad = fields(cost_micros="x")
    reject = Reject("1767225600000-0", bad, "field cost_micros is not an integer")
    assert db.insert([], [reject]) == 0
    db.insert([], [reject])
    assert db.rejects() == [{"ledger_id": "1767225600000-0", "fields": bad,
                             "reason": "field cost_micros is not an integer"}]
    assert db.count() == 0


def test_config_defaults_and_relative_paths(tmp_path):
    config = LedgerConfig()
    assert (config.kind, config.batch, config.retain_rows) == ("sqlite", 500, 10_000)
    assert config.sqlite_path(tmp_path) == tmp_path / ".run/ledger.sqlite3"
    assert config.resolved(tmp_path).database == f"sqlite:///{tmp_path}/.run/ledger.sqlite3"
    assert LedgerConfig(database="sqlite:////var/x.db").sqlite_path(tmp_path).as_posix() == "/var/x.db"
    db = Database.open(config, base=tmp_path)
    db.count()
    db.close()
    assert (tmp_path / ".run/ledger.sqlite3").exists()
    pg = LedgerConfig(database="postgresql://qbt@db.internal:5432/ledger", password_file=tmp_path / "pw")
    assert pg.kind == "postgresql" and pg.resolved(tmp_path) == pg


@pytest.mark.parametrize("values, message", [
    ({"database": "mysql://u@h/db"}, "must be sqlite:///<path> or postgresql://"),
    ({"database": "sqlite:///"}, "needs a path"),
    ({"database": "sqlite://relative.db"}, "must be sqlite"),
    ({"database": "postgresql://qbt:hunter2@h:5432/db"}, "contains a password"),
    ({"database": "postgresql://qbt@h:5432/db?password=hunter2"}, "contains a password"),
    ({"password_file": "/run/pw"}, "PostgreSQL ledger only"),
    ({"batch": 0}, "greater than or equal to 1"),
    ({"retain_rows": -1}, "greater than or equal to 0"),
    ({"block_ms": 5000}, "less than or equal to 4000"),
    ({"exporter": True}, "Extra inputs are not permitted"),
])
def test_config_refusals(values, message):
    with pytest.raises(ValidationError, match=message) as e:
        LedgerConfig(**values)
    assert "hunter2" not in str(e.value)


def test_a_locked_database_waits_rather_than_fails(db, tmp_path):
    db.count()
    other = sqlite3.connect(tmp_path / "ledger.sqlite3", isolation_level=None, check_same_thread=False)
    other.execute("BEGIN IMMEDIATE")  # the CLI or a second process writing
    threading.Timer(0.5, other.execute, ("COMMIT",)).start()
    started = time.monotonic()
    assert db.insert([parse_entry("1767225600000-0", fields())]) == 1
    assert time.monotonic() - started >= 0.4
    other.close()
