"""After traffic, Ray's Prometheus export shows the qbt_ metrics, and request ids reach the ledger."""

from __future__ import annotations

import time

import httpx
import pytest

from tests.support import MODEL, scrape, value, wait_for_rows

GUARD = "qbt-dev-guard"

pytestmark = pytest.mark.e2e


def test_metrics_after_traffic(stack, client, http):
    for stream in (False, True):
        res = client.completions.create(model=MODEL, prompt="The capital of Canada is", max_tokens=4, stream=stream)
        list(res) if stream else res
    http.post("/v1/completions", json={"model": "nope", "prompt": "x"})
    names = ["ray_qbt_requests_total", "ray_qbt_prompt_tokens_total", "ray_qbt_completion_tokens_total",
             "ray_qbt_time_to_first_token_seconds_bucket", "ray_qbt_request_duration_seconds_bucket",
             "ray_qbt_credit_charged_usd_total", "ray_vllm_kv_cache_usage_perc", "ray_vllm_num_requests_running"]
    text = scrape(stack, names)
    deadline = time.monotonic() + 60
    while value(text, "ray_qbt_requests_total", code="model_not_found") < 1 and time.monotonic() < deadline:
        time.sleep(2)  # Ray exports application metrics on an interval
        text = scrape(stack, names)
    assert value(text, "ray_qbt_requests_total", model=MODEL, status="ok") >= 2
    assert value(text, "ray_qbt_requests_total", code="model_not_found") >= 1
    assert value(text, "ray_qbt_credit_charged_usd_total", model=MODEL) > 0


def test_request_id_is_kept_and_in_the_ledger(stack, customer, r):
    res = httpx.post(stack.base_url + "/v1/completions", timeout=60,
                     headers={"Authorization": f"Bearer {customer.key}", "x-request-id": "trace-me-123"},
                     json={"model": MODEL, "prompt": "The capital of Canada is", "max_tokens": 2})
    assert res.headers["x-request-id"] == "trace-me-123"
    (row,) = wait_for_rows(r, customer.account, 1)
    assert row["request_id"] == "trace-me-123" and row["completion_id"] == res.json()["id"]


def spans_of(stack, trace_id: str, names: set[str], timeout: float = 60) -> dict[str, dict]:
    """The spans of one trace, from the console exporter's lines in the Ray workers' stdout logs."""
    import json

    deadline = time.monotonic() + timeout
    found: dict[str, dict] = {}
    while time.monotonic() < deadline:
        for path in stack.ray_tmp.glob("session_*/logs/worker-*.out"):
            for line in path.read_text(errors="replace").splitlines():
                if trace_id in line and line.lstrip().startswith("{"):
                    span = json.loads(line[line.index("{"):])
                    found.setdefault(_named(span), span)
        if names <= set(found):
            return found
        time.sleep(1)
    raise AssertionError(f"spans missing: {sorted(names - set(found))}; found {sorted(found)}")


def _named(span: dict) -> str:
    """A span's name, and for the guard's checks (`apply_guardrail <guard>`) whose content: input or output."""
    source = span.get("attributes", {}).get("gen_ai.guardrail.source")
    return f"{span['name']} {source}" if source else span["name"]


def test_a_streaming_request_is_one_trace_across_the_handle(stack, make_customer):
    customer = make_customer(guard="both")
    trace_id, client_span = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
    with httpx.stream("POST", stack.base_url + "/v1/completions", timeout=60,
                      json={"model": MODEL, "prompt": "The capital of Canada is", "max_tokens": 4, "stream": True},
                      headers={"Authorization": f"Bearer {customer.key}",
                               "traceparent": f"00-{trace_id}-{client_span}-01"}) as res:
        assert res.status_code == 200
        list(res.iter_lines())
    guard_in, generate, guard_out = f"apply_guardrail {GUARD} input", f"text_completion {MODEL}", \
        f"apply_guardrail {GUARD} output"
    names = {"qbt.completion", "qbt.admission", guard_in, generate, "qbt.engine", guard_out, "qbt.settle"}
    spans = spans_of(stack, trace_id, names)

    def sid(name):
        return spans[name]["context"]["span_id"]

    assert spans["qbt.completion"]["parent_id"] == "0x" + client_span
    for name in ("qbt.admission", guard_in, generate, guard_out, "qbt.settle"):
        assert spans[name]["parent_id"] == sid("qbt.completion"), name
    assert spans["qbt.engine"]["parent_id"] == sid(generate)
    assert [e["name"] for e in spans[generate]["events"]] == ["first_token"]


def test_the_stack_listens_on_loopback_only(stack):
    """Least exposure locally: `make serve` answers on 127.0.0.1, and so does every Ray process it started (GCS,
    raylet, agents, Ray's metrics export): the launcher runs Ray as a one-machine Ray."""
    import psutil
    from urllib.parse import urlparse

    pids = {p.pid for p in stack.descendants()}
    listening = [c for c in psutil.net_connections("tcp") if c.status == psutil.CONN_LISTEN and c.pid in pids]
    assert {urlparse(stack.base_url).port, urlparse(stack.metrics_url).port} <= {c.laddr.port for c in listening}
    exposed = [(c.laddr, psutil.Process(c.pid).name()) for c in listening
               if c.laddr.ip not in ("127.0.0.1", "::ffff:127.0.0.1", "::1")]
    # Serve 2.60 binds each replica's internal gRPC server (handle calls between deployments) to [::] whatever the
    # node's address (replica.py, "[::]:0"); those calls need Ray's auth token. Everything else is on loopback.
    assert [e for e in exposed if not e[1].startswith("ray::ServeRepl")] == []
    assert all(e[0].ip == "::" for e in exposed)
