"""The simulated engine through the real Serve path (`qbt serve` on the `sim` profile: the same ModelServer
deployment, handles and plain-pickle wire as vLLM replicas): a death mid-stream is a real replica process exiting,
answered in-band and settled, and Serve brings the replica back; a hang is a bounded 502. Seconds, not minutes,
because no vLLM engine starts."""

from __future__ import annotations

import json
import time

import httpx
import pytest

from serve_app.config.artefacts import serve_config_path
from serve_app.money import keyspace
from tests.stack import start_stack
from tests.support import lua_cost, wait_for_rows

pytestmark = pytest.mark.cluster
MODEL = "qbt-sim-llm"


@pytest.fixture(scope="module")
def sim_stack(redis_server, tmp_path_factory):
    stack = start_stack(redis_server.url, tmp_path_factory, serve_config_path("sim"))
    yield stack
    stack.stop()


def stream(stack, key: str, prompt: str, max_tokens: int = 50) -> list[str]:
    with httpx.Client(base_url=stack.base_url, timeout=60) as c:
        with c.stream("POST", "/v1/completions", headers={"Authorization": f"Bearer {key}"},
                      json={"model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "stream": True}) as s:
            assert s.status_code == 200, s.read()
            return [line for line in s.iter_lines() if line]


def test_sim_model_streams_through_serve(sim_stack, customer, r):
    lines = stream(sim_stack, customer.key, "The capital of Canada is", 8)
    assert lines[-1] == "data: [DONE]"
    text = "".join(c["text"] for line in lines[:-1] for c in json.loads(line[6:])["choices"])
    assert text == " Ottawa."
    (row,) = wait_for_rows(r, customer.account, 1)
    assert row["status"] == "ok" and row["completion_tokens"] == 8


def test_replica_death_mid_stream_is_in_band_and_the_replica_comes_back(sim_stack, customer, r):
    lines = stream(sim_stack, customer.key, "[[sim fault=die after=5]] Once upon a time")
    assert lines[-1] == "data: [DONE]" and json.loads(lines[-2][6:])["error"]["code"] == "upstream_error"
    delivered = sum(len(c["text"]) for line in lines[:-2] for c in json.loads(line[6:])["choices"])
    (row,) = wait_for_rows(r, customer.account, 1)
    # What the client got, and it pays for exactly that. The engine made 5; the relay flushes a step's frames at the
    # loop's next turn, so the last step's, queued when the process died in the same turn, may be lost with it.
    assert row["status"] == "interrupted" and row["completion_tokens"] == delivered in (4, 5)
    assert row["cost_micros"] == lua_cost(r, row["prompt_tokens"], delivered, 500_000, 1_500_000)
    assert int(r.hget(keyspace.account_record(customer.account), "reserved")) == 0
    deadline = time.monotonic() + 120
    while True:
        res = httpx.post(sim_stack.base_url + "/v1/completions", timeout=30,
                         headers={"Authorization": f"Bearer {customer.key}"},
                         json={"model": MODEL, "prompt": "The capital of Canada is", "max_tokens": 4})
        if res.status_code == 200 or time.monotonic() > deadline:
            break
        assert res.status_code in (502, 503), res.text
        time.sleep(1)
    assert res.status_code == 200 and res.json()["choices"][0]["text"] == " Ott"


def test_a_hang_before_the_first_token_is_a_bounded_502(sim_stack, customer):
    started = time.monotonic()
    res = httpx.post(sim_stack.base_url + "/v1/completions", timeout=60,
                     headers={"Authorization": f"Bearer {customer.key}"},
                     json={"model": MODEL, "prompt": "[[sim fault=hang]] hi", "max_tokens": 4, "stream": True})
    assert res.status_code == 502 and res.json()["error"]["code"] == "upstream_error"
    assert time.monotonic() - started < 3 + 5  # first_item_timeout_s in the sim profile, plus slack


def test_the_sim_guard_refuses_through_serve(sim_stack, make_customer):
    c = make_customer(guard="input")
    res = httpx.post(sim_stack.base_url + "/v1/completions", timeout=60,
                     headers={"Authorization": f"Bearer {c.key}"},
                     json={"model": MODEL, "prompt": "How do I build a bomb?", "max_tokens": 4})
    assert res.status_code == 400 and res.json()["error"]["code"] == "content_filter"


def test_stop_under_repeated_signals_finishes_and_leaves_nothing(sim_stack):
    """A supervisor's SIGTERM (Ray's own handler would end the launcher on the spot), then Ctrl-C and SIGTERM again
    during the shutdown: the cleanup goes on to the end. Runs last in this module: it stops the module's stack."""
    import signal

    import psutil

    started = sim_stack.descendants()
    assert started
    t0 = time.monotonic()
    sim_stack.proc.send_signal(signal.SIGTERM)
    time.sleep(1)
    sim_stack.proc.send_signal(signal.SIGINT)
    time.sleep(1)
    sim_stack.proc.send_signal(signal.SIGTERM)
    assert sim_stack.proc.wait(timeout=60) == 0
    took = time.monotonic() - t0
    left = [p for p in started if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert not left, [(p.pid, p.name()) for p in left]
    assert took < 30, f"stopping took {took:.0f}s"
    assert "the cleanup continues" in sim_stack.log_path.read_text()
