"""The gateway benchmark's report: its figures come from the rounds' CPU counters, paired per round."""

from __future__ import annotations

from benchmarks.gateway import report


def stream_row(rnd: int, system: str, events: int, cpu: dict[str, float], wall_s: float = 60.0) -> dict:
    gateway = sum(v for k, v in cpu.items() if k in ("ingress", "model replica", "proxy", "floor"))
    return {"round": rnd, "system": system, "events": events, "tokens": events, "wall_s": wall_s, "failed": 0,
            "errors": [], "cpu_s": cpu, "gateway_us_per_event": gateway / events * 1e6,
            "gateway_us_per_token": gateway / events * 1e6, "redis_script_calls_per_request": 2.0,
            "steal_pct": 0.1}


def request_row(rnd: int, ok: int, ingress_s: float) -> dict:
    return {"round": rnd, "system": "qbt requests", "concurrency": 32, "ok": ok, "failed": 0, "errors": [],
            "wall_s": 60.0, "cpu_s": {"ingress": ingress_s, "model replica": ingress_s / 2},
            "ingress_us_per_request": ingress_s / ok * 1e6, "redis_script_calls_per_request": 2.0,
            "e2e_p50_ms": 40.0, "steal_pct": 0.1}


def test_the_report_pairs_rounds_and_gives_an_ingress_cores_capacity():
    rows = []
    for rnd, floor_s, ingress_s in ((1, 6.0, 5.0), (2, 5.0, 4.0)):
        rows += [stream_row(rnd, "floor", 100_000, {"floor": floor_s}),
                 stream_row(rnd, "qbt", 100_000, {"ingress": ingress_s, "model replica": 4.0}),
                 stream_row(rnd, "qbt handle", 100_000, {"ingress": 18.0, "model replica": 12.0}),
                 request_row(rnd, 20_000, ingress_s * 12)]
    meta = {"command": "python -m benchmarks.gateway", "machine": "x86_64, 2 CPUs", "when": "now",
            "duration_s": 60, "args": {"streams": 64, "tokens": 256}}
    text = report(rows, meta)
    # x floor, paired: round 1 (5 + 4) / 6 = 1.5, round 2 (4 + 4) / 5 = 1.6 (median 1.55)
    assert "| 1.55 (1.50 to 1.60) |" in text
    # one ingress core: 100,000 events over 5 s and 4 s of its CPU
    assert "22500 (20000 to 25000) events/s" in text
    # relay / handle, paired: 9/30 and 8/30
    assert "round: 0.28 (0.27 to 0.30)." in text
    # admitted requests per ingress core: 20,000 over 60 s and 48 s of ingress CPU
    assert "| 375.00 (333.33 to 416.67) |" in text
