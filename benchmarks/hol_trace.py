"""Where a short request waits behind a long stream: the head-of-line probe of `compare.py` (a 2-token whole request
sent 0.4 s into a 480-token stream, dev engine, guard off), against this service started with console traces
(`OTEL_TRACES_EXPORTER=console`), its time split by the request's own spans:

    .venv/bin/python -m benchmarks.hol_trace [--trials 25]

before admission (auth, body, tokenizing), admission (a Redis script), the handle's way to the model replica (Serve's
router and transport), the engine (the replica's span: vLLM's intake, scheduling and steps), the way back, and the
settlement (a Redis script), with what Redis's latency monitor saw meanwhile (its writes wait for an fsync:
`appendfsync always`). Tracing costs a little itself, so the totals here are not the comparison's figures; the split
is what this is for. Writes benchmarks/results/hol-trace.{json,md}, every trial's stages in the JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import statistics
import sys
import time
from datetime import datetime
from pathlib import Path

from benchmarks.servers import OUT, ROOT, System, bench_keys, say
from benchmarks.sse_client import head_of_line
from serve_app.money import keyspace
from serve_app.ops.launcher import stop_descendants
from serve_app.ops.processes import become_subreaper

RUN_DIR = ROOT / ".run" / "bench-hol-trace"
PORT, METRICS_PORT, REDIS_URL = 8141, 8143, "redis://127.0.0.1:6395/0"
LATENCY_MS = 5  # Redis's latency monitor records events (an fsync among them) at least this long
MODEL = "qbt-dev-llm"
GENERATION = f"text_completion {MODEL}"  # the ingress's inference span (GenAI conventions)
STAGES = {  # name: (from, to), each an (span, "start" | "end"); the root span starts at 0
    "before admission (auth, body, tokenizing)": (("qbt.completion", "start"), ("qbt.admission", "start")),
    "admission (Redis script)": (("qbt.admission", "start"), ("qbt.admission", "end")),
    "admitted to the handle call": (("qbt.admission", "end"), (GENERATION, "start")),
    "handle to the model replica": ((GENERATION, "start"), ("qbt.engine", "start")),
    "engine (in the model replica)": (("qbt.engine", "start"), ("qbt.engine", "end")),
    "model replica back to the ingress": (("qbt.engine", "end"), (GENERATION, "end")),
    "settlement (Redis script)": (("qbt.settle", "start"), ("qbt.settle", "end")),
    "whole request at the ingress": (("qbt.completion", "start"), ("qbt.completion", "end")),
}


async def trials(n: int, headers: dict) -> list[dict]:
    out = []
    for i in range(n):
        short, long = await head_of_line(PORT, headers, MODEL, f"probe-{i}")
        out.append({"request_id": f"probe-{i}", "client_ms": short.e2e * 1000, "ok": short.ok and long.ok,
                    "error": short.error or long.error})
        say(f"trial {i + 1}/{n}: short request {short.e2e * 1000:.0f} ms")
    return out


def spans(ray_dir: Path) -> dict[str, list[dict]]:
    """Every span the console exporter wrote into the Ray workers' logs, by trace id (once each)."""
    seen, by_trace = set(), {}
    for path in ray_dir.glob("session_*/logs/worker-*.out"):
        for line in path.read_text(errors="replace").splitlines():
            if not line.startswith("{") or '"trace_id"' not in line:
                continue
            try:
                span = json.loads(line)
            except ValueError:
                continue
            if span["context"]["span_id"] not in seen:
                seen.add(span["context"]["span_id"])
                by_trace.setdefault(span["context"]["trace_id"], []).append(span)
    return by_trace


def stages(trace: list[dict]) -> tuple[str, dict[str, float]] | None:
    at = lambda s: datetime.fromisoformat(s.replace("Z", "+00:00")).timestamp()  # noqa: E731
    named = {s["name"]: s for s in trace}
    root = named.get("qbt.completion")
    if root is None or not all(name in named for name in ("qbt.admission", GENERATION, "qbt.engine", "qbt.settle")):
        return None
    t = lambda name, edge: at(named[name][f"{edge}_time"]) * 1000  # noqa: E731
    return root["attributes"].get("qbt.request_id", ""), {k: t(*b) - t(*a) for k, (a, b) in STAGES.items()}


def report(rows: list[dict], meta: dict) -> str:
    traced = [r for r in rows if r.get("stages")]
    lines = ["# Where the head-of-line probe's short request waits (this service, traced)", "",
             f"Command: `{meta['command']}`", "", f"Machine: {meta['machine']}. Run at {meta['when']}; "
             f"{len(rows)} trials, {len(traced)} with every span. Milliseconds: median (p90, max) over the trials.",
             "", "| stage | ms |", "|---|---|"]
    for name in [*STAGES, "client's whole request"]:
        xs = sorted(r["stages"][name] if name in STAGES else r["client_ms"] for r in traced)
        if xs:
            lines.append(f"| {name} | {statistics.median(xs):.1f} ({xs[int(len(xs) * 0.9) - 1]:.1f}, {xs[-1]:.1f}) |")
    latency = meta.get("redis_latency") or {}
    lines += ["", f"Redis's latency monitor during the trials (events of {LATENCY_MS} ms and more; its history keeps "
              "the longest per second): " + ("; ".join(
                  f"`{event}` {len(ms)} times, at most {max(ms)} ms" for event, ms in sorted(latency.items()))
                  or "none")]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=25)
    parser.add_argument("--out", default="hol-trace", help="results file stem in benchmarks/results")
    args = parser.parse_args()
    become_subreaper()
    shutil.rmtree(RUN_DIR / "ray", ignore_errors=True)  # an earlier run's spans carry the same request ids
    system = System("qbt-traced", PORT, "/health", [
        sys.executable, "-m", "serve_app.ops.cli", "serve", "--port", str(PORT), "--run-dir", str(RUN_DIR / "qbt"),
        "--admin-port", "0"], RUN_DIR, {"REDIS_URL": REDIS_URL, "QBT_METRICS_PORT": str(METRICS_PORT),
                                        "QBT_RAY_TEMP_DIR": str(RUN_DIR / "ray"), "OTEL_TRACES_EXPORTER": "console"})
    latency: dict[str, list[int]] = {}
    try:
        system.wait_ready()
        key = bench_keys(REDIS_URL)["off"]
        redis = keyspace.sync_client(REDIS_URL)
        redis.config_set("latency-monitor-threshold", LATENCY_MS)
        redis.latency_reset()
        rows = asyncio.run(trials(args.trials, {"Authorization": f"Bearer {key}"}))
        latency = {event: [ms for _, ms in redis.latency_history(event)]
                   for event, *_ in redis.latency_latest()}
    finally:
        system.stop()
        stop_descendants()
    split = dict(filter(None, (stages(trace) for trace in spans(RUN_DIR / "ray").values())))
    for row in rows:
        row["stages"] = split.get(row["request_id"])
    meta = {"command": " ".join([".venv/bin/python -m benchmarks.hol_trace", *sys.argv[1:]]), "redis_latency": latency,
            "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
            "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / f"{args.out}.json").write_text(json.dumps({"meta": meta, "trials": rows}))
    (OUT / f"{args.out}.md").write_text(report(rows, meta))
    say(f"wrote {OUT / args.out}.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
