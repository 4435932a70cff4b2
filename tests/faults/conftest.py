"""The fault tier's stack: `qbt serve` on the simulated models (so faults cost seconds, not vLLM restarts) with its
own Redis (killed and paused here), a short reservation lifetime and request bound, and a table of what each fault
cost, printed at the end of the run."""

from __future__ import annotations

import uuid

import pytest
import yaml

from serve_app.config.artefacts import serve_config_path
from serve_app.money import accounts, keyring, keyspace
from tests.stack import start_stack
from tests.support import RedisServer, free_port

RESERVATION_TTL_S = 6  # leases renew every 2 s; a request outliving this unrenewed would be reconciled
MAX_REQUEST_S = 8
RETAIN_ROWS = 20  # exported rows the stream keeps: the bound checked after every fault
RESULTS: list[dict] = []


@pytest.fixture(scope="module")
def fault_redis(tmp_path_factory):
    server = RedisServer(free_port(), tmp_path_factory.mktemp("fault-redis"))
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def fault_config(tmp_path_factory):
    config = yaml.safe_load(serve_config_path("sim").read_text())
    args = config["applications"][0]["args"]
    args.update(reservation_ttl_s=RESERVATION_TTL_S, max_request_s=MAX_REQUEST_S, delivery_checkpoint_s=1,
                ledger={"retain_rows": RETAIN_ROWS, "claim_idle_ms": 2000})  # the database: the run directory's
    path = tmp_path_factory.mktemp("fault-config") / "serve-faults.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(scope="module")
def fault_stack(fault_redis, fault_config, tmp_path_factory):
    stack = start_stack(fault_redis.url, tmp_path_factory, fault_config)
    yield stack
    stack.stop()


@pytest.fixture(scope="module")
def ledger_db(fault_stack):
    """The stack's SQL ledger (SQLite in its run directory, where `qbt serve` puts it)."""
    from serve_app.ledger.database import Database, LedgerConfig
    from serve_app.ops.launcher import ledger_database

    db = Database.open(LedgerConfig(database=ledger_database(fault_stack.run_dir)))
    yield db
    db.close()


@pytest.fixture
def fr(fault_redis):
    return keyspace.sync_client(fault_redis.url)


@pytest.fixture
def paying(fr):
    """Four customers with credit (the load's keys, guard off) and one probe customer outside the invariants."""

    def make(n: int = 4, guard: str = "off") -> tuple[list[str], list[str], str]:
        names, keys = [], []
        for _ in range(n):
            name = "f-" + uuid.uuid4().hex[:10]
            accounts.create_account(fr, name, "1000")
            key, _ = keyring.create_key(fr, name, guard=guard)
            names.append(name)
            keys.append(key)
        probe = "p-" + uuid.uuid4().hex[:10]
        accounts.create_account(fr, probe, "1000")
        return names, keys, keyring.create_key(fr, probe, guard="off")[0]

    return make


def pytest_terminal_summary(terminalreporter):
    if not RESULTS:
        return
    terminalreporter.section("faults: what each cost (targets: lost 0, unbilled 0)")
    terminalreporter.write_line(f"{'fault':<34} {'requests':>8} {'tokens':>7} {'recovery_s':>10} {'lost_micros':>11} "
                                f"{'unbilled':>8} {'worst':>5} {'over':>4} {'left':>4}  outcomes")
    for r in RESULTS:
        rec = "-" if r["recovery_s"] is None else f"{r['recovery_s']:.1f}"
        terminalreporter.write_line(f"{r['fault']:<34} {r['requests']:>8} {r['received_tokens']:>7} {rec:>10} "
                                    f"{r['lost_micros']:>11} {r['unbilled']:>8} {r['most_unbilled_tokens']:>5} "
                                    f"{r['overcharged']:>4} "
                                    f"{r['reservations_left']:>4}  "
                                    f"{r['outcomes']}")
