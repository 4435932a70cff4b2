"""The model replica dies under load: in-flight requests get `upstream_error` (in-band once streaming), a stream pays
only for the text it received and a request that received nothing pays nothing, and service recovers when Serve
restarts the replica. Marked disruptive: it kills parts of the shared stack, so it runs after the other e2e tests."""

from __future__ import annotations

import json
import signal
import threading
import time

import httpx
import psutil
import pytest

from serve_app.money import keyspace
from tests.support import MODEL, lua_cost, wait_for_rows

pytestmark = [pytest.mark.e2e, pytest.mark.disruptive]
# 8 prompts x 4 choices x 500 tokens: several seconds of work on the dev model, so the kill lands mid-way.
LONG = {"model": MODEL, "prompt": ["Once upon a time"] * 8, "n": 4, "max_tokens": 500, "ignore_eos": True,
        "temperature": 1.0}


def replica_process(stack, model: str = MODEL) -> psutil.Process:
    """A model replica of ours, found in the launcher's process tree by its Ray process title."""
    title = f"ServeReplica:qbt:model-{model}"
    for p in stack.descendants():
        try:
            if title in " ".join(p.cmdline()):
                return p
        except psutil.NoSuchProcess:
            continue
    raise AssertionError(f"no {title} process under the launcher")


def test_replica_death_is_upstream_error_and_service_recovers(stack, customer, r):
    auth = {"Authorization": f"Bearer {customer.key}"}
    victim = replica_process(stack)
    events: list[str] = []
    non_stream: dict = {}

    def fire_non_stream():
        try:
            non_stream["res"] = httpx.post(stack.base_url + "/v1/completions", json=LONG, headers=auth, timeout=300)
        except Exception as exc:  # reported by the assertion below
            non_stream["res"] = exc

    worker = threading.Thread(target=fire_non_stream)
    worker.start()
    with httpx.Client(base_url=stack.base_url, timeout=300) as c:
        with c.stream("POST", "/v1/completions", json={**LONG, "stream": True}, headers=auth) as s:
            assert s.status_code == 200
            lines = s.iter_lines()
            events.append(next(lines))
            victim.send_signal(signal.SIGKILL)
            events += [line for line in lines if line]
    worker.join(300)

    assert events[-1] == "data: [DONE]"
    error = json.loads(events[-2][6:])["error"]
    assert error["code"] == "upstream_error"
    # A request Serve had not yet started on the dead replica may be retried on the new one: either way it is
    # answered with the contract, and only a served one is charged.
    ns = non_stream["res"]
    assert isinstance(ns, httpx.Response), repr(ns)
    assert ns.status_code in (200, 502)
    if ns.status_code == 502:
        assert ns.json()["error"]["code"] == "upstream_error"

    rows = wait_for_rows(r, customer.account, 2)
    (streamed,) = [row for row in rows if row["status"] == "interrupted"]  # pays for the text it received
    assert streamed["completion_tokens"] >= 1
    assert streamed["cost_micros"] == lua_cost(r, streamed["prompt_tokens"], streamed["completion_tokens"],
                                               500_000, 1_500_000)
    failed = [row for row in rows if row["status"] == "upstream_error"]
    assert len(failed) == (1 if ns.status_code == 502 else 0)
    assert all(row["cost_micros"] == 0 for row in failed)
    assert int(r.hget(keyspace.account_record(customer.account), "reserved")) == 0

    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if httpx.get(stack.base_url + "/health", timeout=30).status_code == 200:
            break
        time.sleep(3)
    res = httpx.post(stack.base_url + "/v1/completions", headers=auth, timeout=120,
                     json={"model": MODEL, "prompt": "The capital of Canada is", "max_tokens": 4, "temperature": 0})
    assert res.status_code == 200 and res.json()["choices"][0]["text"].startswith(" Ottawa")


def test_guard_down_closed_is_502_open_passes_marked(stack, make_customer):
    """A guard that does not answer: its replica's process stopped (SIGSTOP), so every guard call runs out its
    `timeout_s` (10 s), well within Serve's health-check timeout, and the guard stays down for both requests, sent
    together. (With SIGKILL, Serve's restart on a fast host could bring the guard back before the second request;
    a killed guard is `tests/faults`'.)"""
    closed, open_ = make_customer(guard="input"), make_customer(guard="input,open")
    body = {"model": MODEL, "prompt": "The capital of Canada is", "max_tokens": 4, "temperature": 0}
    guard = replica_process(stack, "qbt-dev-guard")
    answers: dict[str, httpx.Response] = {}

    def call(name: str, key: str) -> None:
        answers[name] = httpx.post(stack.base_url + "/v1/completions", json=body, timeout=120,
                                   headers={"Authorization": f"Bearer {key}"})

    guard.send_signal(signal.SIGSTOP)
    try:
        calls = [threading.Thread(target=call, args=args) for args in (("closed", closed.key), ("open", open_.key))]
        for t in calls:
            t.start()
        for t in calls:
            t.join(timeout=120)
    finally:
        guard.send_signal(signal.SIGCONT)
    assert set(answers) == {"closed", "open"}, (
        f"only {sorted(answers)} answered within 120 s: a request thread failed (pytest's warnings show why)")
    res = answers["closed"]
    assert res.status_code == 502 and res.json()["error"]["code"] == "upstream_error"
    assert "guard" in res.json()["error"]["message"]
    res = answers["open"]
    assert res.status_code == 200 and res.headers["x-qbt-guard"] == "unavailable"
    assert res.json()["choices"][0]["text"].startswith(" Ottawa")
