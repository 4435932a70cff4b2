"""Each fault injected under concurrent streaming load, then the money invariants: the balances moved by exactly the
ledger's sum, every token a client received is charged on its request's ledger row, nothing stays reserved, the
Redis stream stays bounded. Tests run in file order; each leaves the stack serving again."""

from __future__ import annotations

import os
import signal
import socket
import time

import pytest

from serve_app.money import keyspace
from tests.faults import conftest
from tests.faults.harness import (MODEL, Load, balances, check, exported, serve_process, settle_quietly,
                                  time_to_serve)

pytestmark = pytest.mark.faults
LOAD_S = 2.0  # streaming under way before the fault


def run_fault(name, stack, fr, db, paying, inject, *, guard: str = "off", recover: bool = True,
              after_s: float = 3.0):
    """Load, inject, keep loading `after_s`, stop the load, time recovery, settle, check, record."""
    accounts, keys, probe = paying(guard=guard)
    before = balances(fr, accounts)
    load = Load(stack.base_url, keys).start()
    time.sleep(LOAD_S)
    injected = time.monotonic()
    inject()
    time.sleep(after_s)
    recovery = time_to_serve(stack.base_url, probe, injected) if recover else None
    sent = load.stop()
    left = settle_quietly(fr, accounts, stack.base_url, probe, timeout=conftest.RESERVATION_TTL_S * 5)
    exported(stack.base_url, conftest.RETAIN_ROWS)
    report = check(name, fr, db, before, sent, recovery, left)
    conftest.RESULTS.append(report.row())
    assert report.received_tokens > 0, "the load received nothing: the fault test measured nothing"
    assert report.stream_length <= conftest.RETAIN_ROWS, report  # the stream is a bounded buffer
    assert report.overcharged == 0, report  # whatever the fault, nobody pays twice
    return report


def assert_exact(report):
    assert report.balance_vs_ledger_micros == 0, report
    assert report.reservations_left == 0, report
    assert report.unbilled == 0 and report.lost_micros == 0, report


def test_no_fault_baseline_tallies_match_the_ledger(fault_stack, fr, ledger_db, paying):
    report = run_fault("none (baseline)", fault_stack, fr, ledger_db, paying, lambda: None, after_s=0.5)
    assert report.outcomes.get("done", 0) >= 12 and set(report.outcomes) <= {"done", "pending"}
    assert_exact(report)


def test_kill_9_of_a_model_replica_mid_stream(fault_stack, fr, ledger_db, paying):
    report = run_fault("kill -9 model replica", fault_stack, fr, ledger_db, paying,
                       lambda: serve_process(fault_stack, f"ServeReplica:qbt:model-{MODEL}").kill())
    assert report.outcomes.get("in_band_error", 0) >= 1, report
    assert_exact(report)


def test_redis_paused_for_10_s(fault_stack, fr, ledger_db, paying, fault_redis):
    def pause():
        os.kill(fault_redis.proc.pid, signal.SIGSTOP)
        try:
            time.sleep(10)
        finally:
            os.kill(fault_redis.proc.pid, signal.SIGCONT)

    report = run_fault("Redis paused (SIGSTOP) 10 s", fault_stack, fr, ledger_db, paying, pause, after_s=1)
    assert_exact(report)


def test_kill_9_of_redis_and_restart_from_the_aof(fault_stack, fr, ledger_db, paying, fault_redis):
    report = run_fault("kill -9 Redis, restart from AOF", fault_stack, fr, ledger_db, paying,
                       fault_redis.crash_and_restart)
    assert_exact(report)


def test_kill_9_of_the_guard_replica(fault_stack, fr, ledger_db, paying):
    report = run_fault("kill -9 guard replica", fault_stack, fr, ledger_db, paying,
                       lambda: serve_process(fault_stack, "ServeReplica:qbt:model-qbt-sim-guard").kill(),
                       guard="input")
    assert_exact(report)


def test_a_client_that_stops_reading_outlives_a_short_reservation_and_pays(fault_stack, fr, ledger_db, paying):
    """Reservations live 6 s and are renewed while the request runs; the request bound (8 s) cuts the stream off;
    it settles what was produced, once, never reconciled as expired."""
    accounts, keys, probe = paying(n=1)
    before = balances(fr, accounts)
    host, port = fault_stack.base_url.removeprefix("http://").split(":")
    body = (b'{"model": "%s", "prompt": "Once upon a time", "max_tokens": 3000, "stream": true}' % MODEL.encode())
    with socket.create_connection((host, int(port))) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # fills fast: the server blocks on sending
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Authorization: Bearer %s\r\nx-request-id: stalled\r\nContent-Length: %d\r\n\r\n%s"
                     % (keys[0].encode(), len(body), body))
        assert sock.recv(12).startswith(b"HTTP/1.1 200")
        time.sleep(conftest.MAX_REQUEST_S + 3)  # reads nothing more
    left = settle_quietly(fr, accounts, fault_stack.base_url, probe)
    exported(fault_stack.base_url, conftest.RETAIN_ROWS)
    rows = ledger_db.rows(accounts[0])
    report = check("client stops reading, 6 s reservations", fr, ledger_db, before, [], None, left)
    report.requests, report.outcomes = 1, {"stalled": 1}
    conftest.RESULTS.append(report.row())
    (row,) = rows
    assert row["status"] == "timed_out" and row["completion_tokens"] > 0 and row["cost_micros"] > 0, row
    assert report.balance_vs_ledger_micros == 0 and left == 0


def test_kill_9_of_the_ledger_exporter_mid_batch(fault_stack, fr, ledger_db, paying):
    """Rows keep coming while the exporter dies; Serve restarts it, the new consumer claims the dead one's pending
    batch: every row reaches the database once (the balance-to-ledger check above counts every micro-dollar)."""
    report = run_fault("kill -9 ledger exporter", fault_stack, fr, ledger_db, paying,
                       lambda: serve_process(fault_stack, "ServeReplica:qbt:LedgerExporter").kill())
    assert_exact(report)
    assert fr.xlen(keyspace.LEDGER) <= conftest.RETAIN_ROWS


def test_kill_9_of_the_ingress_replica_mid_stream(fault_stack, fr, ledger_db, paying):
    """Last: the clients' connections die with the ingress. What they received is known to Redis up to the last
    delivery checkpoint of the dead ingress: the reconciliation charges that (README, fault table)."""
    report = run_fault("kill -9 ingress replica", fault_stack, fr, ledger_db, paying,
                       lambda: serve_process(fault_stack, "ServeReplica:qbt:Ingress").kill())
    assert report.balance_vs_ledger_micros == 0 and report.reservations_left == 0, report
    # What its clients received after the dead ingress's last delivery checkpoint (1 s here, 50 tokens/s a stream)
    # is all a crash can leave unbilled; before the checkpoints, whole streams were.
    assert report.most_unbilled_tokens <= 80, report
    assert report.recovery_s is not None
