"""The gateway's own cost, on the simulated engine at GPU-like rates (many streams, 50 engine steps per second):
CPU microseconds per streamed event and per request for each of the gateway's processes, against the floor (a bare
Starlette/uvicorn SSE server fed by the same generator, `benchmarks/floor_server.py`), with real Redis.

    .venv/bin/python -m benchmarks.gateway [--rounds 5] [--duration 20] [--streams 64] [--tokens 256]

Per round, interleaved (the order rotates): streams through the floor, through the gateway (guard off), through the
gateway with the guard's default policy (`both`), then short whole requests through the gateway (admissions per
ingress core). CPU is read per process (psutil) over each run; Redis's script calls per request come from its
command statistics. Writes benchmarks/results/gateway.{json,md}; the JSON keeps every request's sample.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil

from benchmarks.sse_client import closed_loop
from serve_app.money import accounts, keyspace
from serve_app.ops.launcher import become_subreaper, stop_descendants

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "benchmarks" / "results"
RUN_DIR = ROOT / ".run" / "bench-gateway"
PY = sys.executable
REDIS_URL = "redis://127.0.0.1:6397/0"
FLOOR_PORT, QBT_PORT, METRICS_PORT = 8121, 8122, 8123
MODEL = "qbt-sim-llm"
ROLES = ("ingress", "model replica", "guard replica", "proxy", "redis", "ray", "other", "floor")


def say(msg: str) -> None:
    print(f"[bench] {msg}", flush=True)


def role(p: psutil.Process) -> str:
    try:
        cmd = " ".join(p.cmdline())
    except psutil.Error:
        return "other"
    if "floor_server" in cmd:
        return "floor"
    if "Ingress" in cmd:
        return "ingress"
    if "model-qbt-sim-guard" in cmd:
        return "guard replica"
    if "model-qbt-sim-llm" in cmd:
        return "model replica"
    if "ProxyActor" in cmd or "haproxy" in cmd.lower():
        return "proxy"
    if "redis-server" in cmd:
        return "redis"
    if any(x in cmd for x in ("raylet", "gcs_server", "ServeController", "dashboard", "ray::", "ray/_private")):
        return "ray"
    return "other"


class CpuMeter:
    """CPU seconds per role over a window, from every process under the given roots (their ids, not names)."""

    def __init__(self, roots: list[subprocess.Popen]):
        self.roots = roots

    def snapshot(self) -> dict[int, tuple[str, float]]:
        out = {}
        for root in self.roots:
            try:
                procs = [psutil.Process(root.pid), *psutil.Process(root.pid).children(recursive=True)]
            except psutil.NoSuchProcess:
                continue
            for p in procs:
                try:
                    t = p.cpu_times()
                    out[p.pid] = (role(p), t.user + t.system)
                except psutil.Error:
                    pass
        return out

    @staticmethod
    def delta(before: dict, after: dict) -> dict[str, float]:
        per = {r: 0.0 for r in ROLES}
        for pid, (r, t) in after.items():
            per[r] += t - (before[pid][1] if pid in before else 0.0)
        return per


def start(name: str, cmd: list[str], env: dict | None = None) -> subprocess.Popen:
    RUN_DIR.mkdir(parents=True, exist_ok=True)
    say(f"starting {name}: {' '.join(cmd)}")
    return subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, **(env or {})}, stdout=(RUN_DIR / f"{name}.log").open("w"),
                            stderr=subprocess.STDOUT, start_new_session=True)


def wait_ready(name: str, url: str, proc: subprocess.Popen, timeout_s: float = 600) -> None:
    started = time.monotonic()
    while time.monotonic() - started < timeout_s:
        if proc.poll() is not None:
            raise SystemExit(f"{name} exited with {proc.returncode}; its log: {RUN_DIR / (name + '.log')}")
        try:
            if httpx.get(url, timeout=5).status_code == 200:
                say(f"{name} ready after {time.monotonic() - started:.0f} s")
                return
        except httpx.HTTPError:
            pass
        time.sleep(2)
    raise SystemExit(f"{name} not ready after {timeout_s:.0f} s; its log: {RUN_DIR / (name + '.log')}")


def keys_for_bench() -> tuple[dict[str, str], object]:
    r = keyspace.sync_client(REDIS_URL)
    accounts.ensure_account(r, "bench", "1000000")
    made = {g: accounts.create_key(r, "bench", rpm=10**7, tpm=10**10, concurrency=10**5, guard=g)[0]
            for g in ("off", "both")}
    return made, r


def script_calls(r) -> int:
    stats = r.info("commandstats")
    return sum(v["calls"] for k, v in stats.items() if k.split("|")[0] in ("cmdstat_evalsha", "cmdstat_eval",
                                                                            "cmdstat_fcall"))


async def run_point(name: str, port: int, key: str | None, body: dict, concurrency: int, duration_s: float,
                    meter: CpuMeter, redis, label: str = "") -> dict:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    calls = script_calls(redis) if redis is not None and key else None
    before, client_before = meter.snapshot(), time.process_time()
    samples, wall = await closed_loop("127.0.0.1", port, body, headers, concurrency, duration_s)
    cpu = CpuMeter.delta(before, meter.snapshot())
    cpu["load client"] = time.process_time() - client_before
    ok = [s for s in samples if s.ok]
    events = sum(s.events for s in ok)
    row = {"system": name, "stream": bool(body.get("stream")), "concurrency": concurrency,
           "max_tokens": body["max_tokens"], "wall_s": wall, "requests": len(samples), "ok": len(ok),
           "failed": len(samples) - len(ok), "errors": sorted({s.error for s in samples if s.error})[:5],
           "events": events, "tokens": sum(s.tokens for s in ok), "cpu_s": cpu,
           "redis_script_calls_per_request": ((script_calls(redis) - calls) / len(samples))
           if calls is not None and samples else None,
           "loadavg": os.getloadavg(), "samples": [s.row() for s in samples]}
    gateway = sum(cpu[r] for r in ("ingress", "model replica", "proxy")) if name != "floor" else cpu["floor"]
    row["gateway_us_per_event"] = gateway / events * 1e6 if events else None
    row["ingress_us_per_request"] = cpu["ingress"] / len(ok) * 1e6 if ok and name != "floor" else None
    e2e = sorted(s.e2e for s in ok)
    row["e2e_p50_ms"] = e2e[len(e2e) // 2] * 1000 if e2e else None
    tokens = row["tokens"]
    row["gateway_us_per_token"] = row["gateway_us_per_event"] * events / tokens if tokens and events else None
    say(f"{name + label:13s} {'stream' if row['stream'] else 'whole '} c={concurrency:<4d} {len(ok)} ok, {row['failed']} failed,"
        f" {events / wall:7.0f} events/s, gateway {row['gateway_us_per_event'] or 0:6.1f} us/event, "
        + ", ".join(f"{k} {v:.2f}s" for k, v in cpu.items() if v > 0.05))
    return row


async def measure(args, keys: dict[str, str], meter: CpuMeter, redis) -> list[dict]:
    stream = {"model": MODEL, "prompt": "The quick brown fox", "max_tokens": args.tokens, "stream": True,
              "stream_options": {"include_usage": True}}
    whole = {"model": MODEL, "prompt": "The quick brown fox", "max_tokens": 1}
    points = [("floor", FLOOR_PORT, None, stream, args.streams), ("qbt", QBT_PORT, keys["off"], stream, args.streams),
              ("qbt+guard", QBT_PORT, keys["both"], stream, args.streams)]
    admissions = ("qbt requests", QBT_PORT, keys["off"], whole, args.request_concurrency)
    say("warm-up: every configuration once, 5 s")
    for name, port, key, body, c in [*points, admissions]:
        await run_point(name, port, key, body, c, 5, meter, redis, " (warm-up)")
    rows = []
    for rnd in range(args.rounds):
        order = points[rnd % len(points):] + points[:rnd % len(points)]
        for name, port, key, body, c in [*order, admissions]:
            row = await run_point(name, port, key, body, c, args.duration, meter, redis)
            row["round"] = rnd + 1
            rows.append(row)
    return rows


def spread(xs: list[float]) -> str:
    xs = [x for x in xs if x is not None]
    if not xs:
        return "-"
    return f"{statistics.median(xs):.2f} ({min(xs):.2f}-{max(xs):.2f})"


def report(rows: list[dict], meta: dict) -> str:
    by = {(r["round"], r["system"]): r for r in rows}
    rounds = sorted({r["round"] for r in rows})
    lines = ["# The gateway's own cost (simulated engine)", "", f"Command: `{meta['command']}`", "",
             f"Machine: {meta['machine']}. Run at {meta['when']}; {len(rounds)} interleaved rounds of "
             f"{meta['duration_s']:g} s per point after a 5 s warm-up of each. Medians of the rounds, (min-max); "
             "ratios are paired per round.", "",
             "| system | events/s | failed | gateway CPU us/event | x floor (paired) | ingress us/event | "
             "model replica us/event | proxy us/event | Redis scripts/request |", "|" + "---|" * 9]
    for name in ("floor", "qbt", "qbt+guard"):
        rs = [by[(n, name)] for n in rounds if (n, name) in by]
        per = lambda k: [r["cpu_s"][k] / r["events"] * 1e6 if r["events"] else None for r in rs]  # noqa: E731
        ratio = [by[(n, name)]["gateway_us_per_event"] / by[(n, "floor")]["gateway_us_per_event"]
                 for n in rounds if (n, name) in by and (n, "floor") in by]
        lines.append(f"| {name} | {spread([r['events'] / r['wall_s'] for r in rs])} | {sum(r['failed'] for r in rs)} "
                     f"| {spread([r['gateway_us_per_event'] for r in rs])} | {spread(ratio)} | "
                     f"{spread(per('ingress')) if name != 'floor' else '-'} | "
                     f"{spread(per('model replica')) if name != 'floor' else '-'} | "
                     f"{spread(per('proxy')) if name != 'floor' else '-'} | "
                     f"{spread([r['redis_script_calls_per_request'] for r in rs])} |")
    reqs = [by[(n, "qbt requests")] for n in rounds if (n, "qbt requests") in by]
    lines += ["", "Short whole requests (`max_tokens` 1, concurrency "
              f"{reqs[0]['concurrency'] if reqs else '-'}), guard off:", "",
              "| requests/s | failed | ingress CPU us/request | admitted requests/s per ingress core | "
              "Redis scripts/request | e2e p50 ms |", "|---|---|---|---|---|---|",
              f"| {spread([r['ok'] / r['wall_s'] for r in reqs])} | {sum(r['failed'] for r in reqs)} | "
              f"{spread([r['ingress_us_per_request'] for r in reqs])} | "
              f"{spread([1e6 / r['ingress_us_per_request'] for r in reqs if r['ingress_us_per_request']])} | "
              f"{spread([r['redis_script_calls_per_request'] for r in reqs])} | "
              f"{spread([r['e2e_p50_ms'] for r in reqs])} |"]
    errors = sorted({e for r in rows for e in r["errors"]})
    if errors:
        lines += ["", "Failures seen: " + "; ".join(errors)]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--duration", type=float, default=20, help="seconds per point")
    parser.add_argument("--streams", type=int, default=64, help="concurrent streams")
    parser.add_argument("--tokens", type=int, default=256, help="tokens per stream")
    parser.add_argument("--request-concurrency", type=int, default=32)
    parser.add_argument("--out", default="gateway", help="results file stem in benchmarks/results")
    args = parser.parse_args()
    become_subreaper()
    procs = []
    try:
        procs.append(start("floor", [PY, "-m", "benchmarks.floor_server", str(FLOOR_PORT)]))
        procs.append(start("qbt", [PY, "-m", "serve_app.ops.cli", "serve", "--config",
                                   str(ROOT / "cluster" / "serve-sim.yaml"), "--port", str(QBT_PORT),
                                   "--run-dir", str(RUN_DIR / "qbt")],
                           {"REDIS_URL": REDIS_URL, "QBT_METRICS_PORT": str(METRICS_PORT)}))
        wait_ready("floor", f"http://127.0.0.1:{FLOOR_PORT}/health", procs[0])
        wait_ready("qbt", f"http://127.0.0.1:{QBT_PORT}/health", procs[1])
        keys, redis = keys_for_bench()
        meter = CpuMeter(procs)
        rows = asyncio.run(measure(args, keys, meter, redis))
        meta = {"command": " ".join([".venv/bin/python -m benchmarks.gateway", *sys.argv[1:]]),
                "machine": f"{platform.machine()}, {os.cpu_count()} CPUs", "duration_s": args.duration,
                "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "args": vars(args),
                "serve_env": {k: v for k, v in os.environ.items() if k.startswith("RAY_SERVE")}}
        OUT.mkdir(parents=True, exist_ok=True)
        (OUT / f"{args.out}.json").write_text(json.dumps({"meta": meta, "runs": rows}))
        text = report(rows, meta)
        (OUT / f"{args.out}.md").write_text(text)
        print(text)
        return 0
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGINT)
        for p in procs:
            try:
                p.wait(timeout=90)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
        stop_descendants(grace_s=10)


if __name__ == "__main__":
    sys.exit(main())
