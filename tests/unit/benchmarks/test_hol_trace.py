"""The head-of-line split: stages read from a request's spans as the console exporter writes them."""

from __future__ import annotations

import json

from benchmarks.hol_trace import GENERATION, report, spans, stages


def span(name: str, start_ms: float, end_ms: float, span_id: str, **attributes) -> dict:
    at = lambda ms: f"2026-11-28T01:00:00.{int(ms * 1000):06d}Z"  # noqa: E731
    return {"name": name, "context": {"trace_id": "0x1", "span_id": span_id}, "start_time": at(start_ms),
            "end_time": at(end_ms), "attributes": attributes}


def test_the_stages_of_one_request_come_from_its_spans(tmp_path):
    trace = [span("qbt.completion", 0, 40, "a", **{"qbt.request_id": "probe-3"}), span("qbt.admission", 1, 4, "b"),
             span(GENERATION, 4.5, 35, "c"), span("qbt.engine", 9, 33, "d"), span("qbt.settle", 35.5, 38, "e")]
    logs = tmp_path / "session_x" / "logs"
    logs.mkdir(parents=True)
    lines = ["not a span", *(json.dumps(s) for s in trace), json.dumps(trace[0])]  # a span seen twice counts once
    (logs / "worker-1.out").write_text("\n".join(lines) + "\n")
    traces = spans(tmp_path)
    assert [len(t) for t in traces.values()] == [5]
    rid, split = stages(traces["0x1"])
    rounded = {k: round(v, 3) for k, v in split.items()}
    assert rid == "probe-3" and rounded == {
        "before admission (auth, body, tokenizing)": 1, "admission (Redis script)": 3,
        "admitted to the handle call": 0.5, "handle to the model replica": 4.5, "engine (in the model replica)": 24,
        "model replica back to the ingress": 2, "settlement (Redis script)": 2.5, "whole request at the ingress": 40}
    assert stages(trace[:2]) is None  # a request without every span is left out
    md = report([{"request_id": rid, "client_ms": 45.0, "ok": True, "stages": split}], {
        "command": "c", "machine": "m", "when": "w", "redis_latency": {"aof-fsync-always": [7, 430]}})
    assert "| engine (in the model replica) | 24.0 (24.0, 24.0) |" in md and "| client's whole request | 45.0" in md
    assert "`aof-fsync-always` 2 times, at most 430 ms" in md
