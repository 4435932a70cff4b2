"""The exporter against a real Redis and a real database (SQLite, and a PostgreSQL server started once for the
module): rows move once, exactly; a crash between the insert and the acknowledgement duplicates nothing and loses
nothing; the stream keeps every unacknowledged entry and at most `retain_rows` acknowledged ones; a malformed entry
is set aside; a PostgreSQL killed with -9 only delays the export. The stream is shared with the other Redis tests:
each test writes rows for its own accounts and compares by account."""

from __future__ import annotations

import threading
import time
import uuid

import pytest
import redis

from serve_app.config.service import Prices
from serve_app.ledger.database import Database, LedgerConfig
from serve_app.ledger.export import GROUP, Exporter
from serve_app.money import accounts, keyring, keys, keyspace, units
from serve_app.money.admission import Admitter
from serve_app.money.ledger import ledger_rows
from serve_app.money.settlement import Settlement, Settler
from serve_app.money.status import Status
from tests.postgres import PostgresServer

LEDGER = keyspace.LEDGER
BIG = 2**62 + 1  # beyond a float's exact integers


class Crash(Exception):
    """The exporter's process dying at this point."""


@pytest.fixture(scope="module")
def postgres_server():
    try:
        server = PostgresServer.create()
    except RuntimeError as e:
        pytest.fail(str(e))
    server.start()
    yield server
    server.remove()


@pytest.fixture(params=["sqlite", "postgresql"])
def config(request, tmp_path):
    """A fresh database of each kind; the exporter's options as the test's keyword arguments."""
    if request.param == "sqlite":
        base = {"database": f"sqlite:///{tmp_path}/ledger.sqlite3"}
    else:
        pg: PostgresServer = request.getfixturevalue("postgres_server")
        base = {"database": pg.create_database("t" + uuid.uuid4().hex[:12]), "password_file": pg.password_file}

    def make(**options) -> LedgerConfig:
        return LedgerConfig(**base, **{"block_ms": 0, **options})

    return make


@pytest.fixture(autouse=True)
def fresh_group(r):
    """Each test starts with no consumer group: its exporter delivers the whole stream from the start."""
    try:
        r.xgroup_destroy(LEDGER, GROUP)
    except redis.ResponseError:
        pass


@pytest.fixture
def databases():
    opened: list[Database] = []

    def open_(config: LedgerConfig) -> Database:
        opened.append(Database.open(config))
        return opened[-1]

    yield open_
    for db in opened:
        db.close()


def exporter(redis_server, db: Database, config: LedgerConfig, consumer: str = "c1") -> Exporter:
    ex = Exporter(keyspace.sync_client(redis_server.url), db, config, consumer)
    ex.ensure_group()
    return ex


def drain(ex: Exporter) -> None:
    for _ in range(1000):
        if not ex.export_once():
            return
    raise AssertionError("the export did not finish")


def add_row(r, account: str, cost: int = 1500, **more) -> str:
    """A row with the fields the settlement script writes."""
    now = int(time.time() * 1000)
    fields = {"request_id": "req-" + uuid.uuid4().hex[:8], "completion_id": "cmpl-" + uuid.uuid4().hex[:8],
              "account": account, "key_id": "k1", "model": "m", "prompt_tokens": 6, "completion_tokens": 3,
              "cost_micros": cost, "status": "ok", "created_ms": now - 5, "settled_ms": now, **more}
    return r.xadd(LEDGER, fields)


def account() -> str:
    return "x-" + uuid.uuid4().hex[:10]


def unacknowledged(r) -> int:
    """Pending plus never delivered, counted (Redis's own `lag` is unknown after an XDEL)."""
    group = next(g for g in r.xinfo_groups(LEDGER) if g["name"] == GROUP)
    return group["pending"] + len(r.xrange(LEDGER, "(" + group["last-delivered-id"], "+"))


async def test_settled_rows_are_exported_once_exactly(r, redis_server, config, databases):
    """Rows the settlement script wrote, read back from the database as the stream reader gives them."""
    name = "x-" + uuid.uuid4().hex[:8]
    accounts.create_account(r, name, "100")
    key, _ = keyring.create_key(r, name)
    client = keyspace.async_client(redis_server.url)
    admitter, settler = Admitter(client, 0, 0, 900), Settler(client)
    prices = Prices(input_usd_per_mtok="0.50", output_usd_per_mtok="1.50")
    for completion in (3, 16, 0):
        a = await admitter.admit(keys.key_hash(key), "cmpl-" + uuid.uuid4().hex, "req", "m", prices, 6, 16)
        await settler.settle(Settlement(a.completion_id, 6, completion, Status.OK))
    await client.aclose()
    db = databases(cfg := config())
    drain(exporter(redis_server, db, cfg))
    in_stream = list(ledger_rows(r, name))
    assert len(in_stream) == 3 and db.rows(name) == in_stream
    assert db.total_micros(name) == sum(row["cost_micros"] for row in in_stream)
    assert units.usd_to_micros(accounts.show_account(r, name)["spent_usd"]) == db.total_micros(name)


def test_rows_move_once_with_exact_totals(r, redis_server, config, databases):
    name = account()
    ids = [add_row(r, name, cost) for cost in (1, 999_999, BIG)]
    db = databases(cfg := config())
    ex = exporter(redis_server, db, cfg)
    drain(ex)
    assert [row["ledger_id"] for row in db.rows(name)] == ids
    assert db.total_micros(name) == BIG + 1_000_000
    assert db.rows(name)[2]["cost_usd"] == "4611686018427.387905"
    assert ex.export_once() == 0 and len(db.rows(name)) == 3
    assert ex.lag()["unexported"] == 0 and unacknowledged(r) == 0


def test_delivering_everything_again_inserts_nothing(r, redis_server, config, databases):
    name = account()
    for _ in range(4):
        add_row(r, name)
    db = databases(cfg := config())
    drain(exporter(redis_server, db, cfg))
    total = db.count()
    r.xgroup_destroy(LEDGER, GROUP)  # the whole stream is delivered again, as after a lost group
    again = exporter(redis_server, db, cfg, "c2")
    drain(again)
    assert again.exported == 0 and db.count() == total and len(db.rows(name)) == 4


@pytest.mark.parametrize("crash_at", ["insert", "ack"])
def test_a_crash_mid_batch_loses_and_duplicates_nothing(r, redis_server, config, databases, crash_at):
    """The exporter dies inside the database transaction, or after its commit and before the acknowledgement; the
    next exporter (another consumer) claims the batch and finishes it."""
    name = account()
    ids = [add_row(r, name, cost) for cost in range(1, 6)]
    cfg = config(claim_idle_ms=0)
    first = exporter(redis_server, databases(cfg), cfg, "dying")
    first.database.count()  # connected, schema made: the crash is in the batch's transaction
    if crash_at == "ack":
        first.redis.xack = lambda *a: (_ for _ in ()).throw(Crash())
    else:
        real_begin = first.database._begin

        def begin_then_die(cur, write):
            real_begin(cur, write)
            if write:
                cur.execute("INSERT INTO ledger_rejects VALUES ('probe', '{}', 'probe', 0)")
                raise Crash()

        first.database._begin = begin_then_die
    with pytest.raises(Crash):
        first.export_once()
    first.database.close()
    db = databases(cfg)
    assert len(db.rows(name)) == (5 if crash_at == "ack" else 0) and db.rejects() == []
    assert r.xpending(LEDGER, GROUP)["pending"] >= 5
    second = exporter(redis_server, db, cfg, "next")
    drain(second)
    assert [row["ledger_id"] for row in db.rows(name)] == ids and db.total_micros(name) == 15
    assert r.xpending(LEDGER, GROUP)["pending"] == 0


def test_the_stream_keeps_what_is_not_acknowledged(r, redis_server, config, databases):
    db = databases(cfg := config(retain_rows=0))
    ex = exporter(redis_server, db, cfg)
    drain(ex)
    assert r.xlen(LEDGER) == 0  # every row exported and acknowledged: none kept
    name = account()
    waiting = [add_row(r, name) for _ in range(3)]
    assert ex.trim() == 0 and r.xlen(LEDGER) == 3  # never delivered: kept
    assert ex.lag() == {"unexported": 3, "pending": 0, "stream_length": 3, "exported": ex.exported, "rejected": 0}
    r.xreadgroup(GROUP, "elsewhere", {LEDGER: ">"}, count=2)  # delivered to a consumer that has not acknowledged
    assert ex.trim() == 0 and [i for i, _ in r.xrange(LEDGER)] == waiting
    r.xack(LEDGER, GROUP, waiting[1])  # acknowledged out of order: the older pending one still holds the trim
    assert ex.trim() == 0 and r.xlen(LEDGER) == 3
    r.xack(LEDGER, GROUP, waiting[0])
    assert ex.trim() == 2 and [i for i, _ in r.xrange(LEDGER)] == waiting[2:]
    drain(ex)
    assert r.xlen(LEDGER) == 0 and [row["ledger_id"] for row in db.rows(name)] == waiting[2:]


def test_the_stream_keeps_the_newest_acknowledged_rows(r, redis_server, config, databases):
    db = databases(cfg := config(retain_rows=3))
    ex = exporter(redis_server, db, cfg)
    name = account()
    ids = [add_row(r, name) for _ in range(5)]
    drain(ex)
    assert [i for i, _ in r.xrange(LEDGER)] == ids[2:]  # readable in Redis, and exported
    assert len(db.rows(name)) == 5
    late = add_row(r, name)
    assert ex.trim() == 1 and [i for i, _ in r.xrange(LEDGER)] == ids[3:] + [late]  # the newest three, in all
    drain(ex)
    fresh = [add_row(r, name) for _ in range(4)]
    assert ex.trim() == 3 and [i for i, _ in r.xrange(LEDGER)] == fresh  # unacknowledged, beyond retain_rows: kept


def test_a_malformed_entry_is_set_aside_and_does_not_block(r, redis_server, config, databases):
    name = account()
    good = add_row(r, name, 10)
    bad = [add_row(r, name, cost_micros="1.5"), r.xadd(LEDGER, {"account": name, "cost_micros": "7"})]
    deleted = add_row(r, name, 99)
    after = add_row(r, name, 20)
    cfg = config(claim_idle_ms=0)
    db = databases(cfg)
    r.xgroup_create(LEDGER, GROUP, id="0")
    r.xreadgroup(GROUP, "dead", {LEDGER: ">"})
    r.xdel(LEDGER, deleted)  # deleted while pending: reported by the claim, recorded as lost
    ex = exporter(redis_server, db, cfg)
    drain(ex)
    assert [row["ledger_id"] for row in db.rows(name)] == [good, after] and db.total_micros(name) == 30
    rejects = {x["ledger_id"]: x for x in db.rejects()}
    mine = {i for i, x in rejects.items() if x["fields"].get("account") == name or not x["fields"]}
    assert mine == {*bad, deleted} and ex.rejected == len(rejects) >= 3  # (the stream may hold earlier tests' too)
    assert rejects[bad[0]]["fields"]["cost_micros"] == "1.5" and "not an integer" in rejects[bad[0]]["reason"]
    assert "missing" in rejects[bad[1]]["reason"] and "deleted" in rejects[deleted]["reason"]
    assert unacknowledged(r) == 0


def test_a_killed_postgres_only_delays_the_export(r, redis_server, postgres_server, databases, caplog):
    pg = postgres_server
    cfg = LedgerConfig(database=pg.create_database("k" + uuid.uuid4().hex[:12]), password_file=pg.password_file,
                       block_ms=50)
    watcher = databases(cfg)
    ex = exporter(redis_server, databases(cfg), cfg)
    stop = threading.Event()
    loop = threading.Thread(target=ex.run, args=(stop,), daemon=True)
    loop.start()
    try:
        name = account()
        before = [add_row(r, name, 1) for _ in range(3)]
        wait_for(lambda: len(watcher.rows(name)) == 3)
        pg.kill9()
        during = [add_row(r, name, 2) for _ in range(3)]
        wait_for(lambda: "ledger export failed" in caplog.text)  # it met the dead server, and kept going
        wait_for(lambda: r.xpending(LEDGER, GROUP)["pending"] >= 3)  # read, not acknowledged
        pg.start()
        wait_for(lambda: len(watcher.rows(name)) == 6)
        assert [row["ledger_id"] for row in watcher.rows(name)] == before + during
        assert watcher.total_micros(name) == 9 and loop.is_alive()
        wait_for(lambda: unacknowledged(r) == 0)
    finally:
        stop.set()
        loop.join(timeout=10)
    assert not loop.is_alive()


def wait_for(check, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except Exception:
            pass
        time.sleep(0.05)
    raise AssertionError("condition not met in time")


def test_under_a_trickle_of_rows_the_loop_gathers_them_into_few_batches(r, redis_server, config, databases):
    """`linger_ms` after a partial batch: 40 rows arriving one every 20 ms go to the database in a handful of
    batches (without it, nearly one batch per row, each with its own reads, commit and trim), and all of them go."""
    cfg = config(linger_ms=300, block_ms=100)
    db = databases(cfg)
    ex = exporter(redis_server, db, cfg)
    drain(ex)  # what earlier tests left in the stream
    batches, export_once = [], ex.export_once
    ex.export_once = lambda: batches.append(export_once()) or batches[-1]
    stop = threading.Event()
    loop = threading.Thread(target=ex.run, args=(stop,), daemon=True)
    loop.start()
    try:
        name = account()
        ids = []
        for _ in range(40):
            ids.append(add_row(r, name, 1))
            time.sleep(0.02)
        wait_for(lambda: len(db.rows(name)) == 40)
    finally:
        stop.set()
        loop.join(timeout=10)
    assert [row["ledger_id"] for row in db.rows(name)] == ids and db.total_micros(name) == 40
    moving = [n for n in batches if n]
    assert sum(moving) >= 40 and len(moving) <= 8, moving
