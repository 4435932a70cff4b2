"""The gateway's own cost, on the simulated engine at GPU-like rates (many streams, 50 engine steps per second):
CPU microseconds per streamed event and per request for each of the gateway's processes, against the floor (a bare
Starlette/uvicorn SSE server fed by the same generator, `benchmarks/floor_server.py`), with real Redis.

    .venv/bin/python -m benchmarks.gateway [--rounds 5] [--duration 60] [--streams 64] [--tokens 256]

Per round, interleaved (the order rotates): streams through the floor, through the gateway (guard off), through the
gateway with the guard's default policy (`both`), through the gateway with the old stream transport (one Serve
handle message per engine step, `stream_transport: handle`, a second stack), then short whole requests through the
gateway (admissions per ingress core). Every other system is paused (SIGSTOP) while one runs, and CPU is read per
process (psutil) of the system under test only; Redis's script calls per request come from its command statistics.
Writes benchmarks/results/gateway.{json,md}; the JSON keeps every request's sample.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sys
import time

from benchmarks.servers import OUT, ROOT, CpuMeter, System, bench_keys, say, script_calls, spread
from benchmarks.servers import HostSteal, steal_spread
from benchmarks.sse_client import closed_loop
from serve_app.ops.launcher import stop_descendants
from serve_app.ops.processes import become_subreaper

RUN_DIR = ROOT / ".run" / "bench-gateway"
PY = sys.executable
REDIS_URL = "redis://127.0.0.1:6397/0"
HANDLE_REDIS_URL = "redis://127.0.0.1:6398/0"  # its own: a paused stack pauses the Redis it started
FLOOR_PORT, QBT_PORT, METRICS_PORT, HANDLE_PORT, HANDLE_METRICS_PORT = 8121, 8122, 8123, 8124, 8125
MODEL = "qbt-sim-llm"


async def run_point(name: str, port: int, key: str | None, body: dict, concurrency: int, duration_s: float,
                    systems: dict[str, System], label: str = "") -> dict:
    """One point, with only its own system running (the others paused) and measured."""
    mine = systems[SYSTEM_OF[name]]
    for other in systems.values():
        if other is not mine:
            other.pause()
    mine.resume()
    meter = CpuMeter([mine])
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    redis_url = HANDLE_REDIS_URL if name == "qbt handle" else REDIS_URL
    calls = script_calls(redis_url) if key else None
    before, client_before, host = meter.snapshot(), time.process_time(), HostSteal()
    samples, wall = await closed_loop("127.0.0.1", port, body, headers, concurrency, duration_s)
    cpu = CpuMeter.delta(before, meter.snapshot())
    steal = host.pct()
    cpu["load client"] = time.process_time() - client_before
    ok = [s for s in samples if s.ok]
    events = sum(s.events for s in ok)
    row = {"system": name, "stream": bool(body.get("stream")), "concurrency": concurrency,
           "max_tokens": body["max_tokens"], "wall_s": wall, "requests": len(samples), "ok": len(ok),
           "failed": len(samples) - len(ok), "errors": sorted({s.error for s in samples if s.error})[:5],
           "events": events, "tokens": sum(s.tokens for s in ok), "cpu_s": cpu,
           "redis_script_calls_per_request": ((script_calls(redis_url) - calls) / len(samples))
           if calls is not None and samples else None,
           "loadavg": os.getloadavg(), "steal_pct": steal, "samples": [s.row() for s in samples]}
    gateway = sum(cpu[r] for r in ("ingress", "model replica", "proxy")) if name != "floor" else cpu["floor"]
    row["gateway_us_per_event"] = gateway / events * 1e6 if events else None
    row["ingress_us_per_request"] = cpu["ingress"] / len(ok) * 1e6 if ok and name != "floor" else None
    e2e = sorted(s.e2e for s in ok)
    row["e2e_p50_ms"] = e2e[len(e2e) // 2] * 1000 if e2e else None
    tokens = row["tokens"]
    row["gateway_us_per_token"] = row["gateway_us_per_event"] * events / tokens if tokens and events else None
    say(f"{name + label:13s} {'stream' if row['stream'] else 'whole '} c={concurrency:<4d} {len(ok)} ok, {row['failed']} failed,"
        f" {events / wall:7.0f} events/s, gateway {row['gateway_us_per_event'] or 0:6.1f} us/event, "
        f"host steal {steal:.1f}%, "
        + ", ".join(f"{k} {v:.2f}s" for k, v in cpu.items() if v > 0.05))
    return row


SYSTEM_OF = {"floor": "floor", "qbt": "qbt", "qbt+guard": "qbt", "qbt requests": "qbt", "qbt handle": "qbt handle"}


async def measure(args, keys: dict[str, str], handle_keys: dict[str, str], systems: dict[str, System]) -> list[dict]:
    stream = {"model": MODEL, "prompt": "The quick brown fox", "max_tokens": args.tokens, "stream": True,
              "stream_options": {"include_usage": True}}
    whole = {"model": MODEL, "prompt": "The quick brown fox", "max_tokens": 1}
    points = [("floor", FLOOR_PORT, None, stream, args.streams), ("qbt", QBT_PORT, keys["off"], stream, args.streams),
              ("qbt+guard", QBT_PORT, keys["both"], stream, args.streams),
              ("qbt handle", HANDLE_PORT, handle_keys["off"], stream, args.streams)]
    admissions = ("qbt requests", QBT_PORT, keys["off"], whole, args.request_concurrency)
    say("warm-up: every configuration once, 5 s")
    for name, port, key, body, c in [*points, admissions]:
        await run_point(name, port, key, body, c, 5, systems, " (warm-up)")
    rows = []
    for rnd in range(args.rounds):
        order = points[rnd % len(points):] + points[:rnd % len(points)]
        for name, port, key, body, c in [*order, admissions]:
            row = await run_point(name, port, key, body, c, args.duration, systems)
            row["round"] = rnd + 1
            rows.append(row)
    return rows


def report(rows: list[dict], meta: dict) -> str:
    by = {(r["round"], r["system"]): r for r in rows}
    rounds = sorted({r["round"] for r in rows})
    lines = ["# The gateway's own cost (simulated engine)", "", f"Command: `{meta['command']}`", "",
             f"Machine: {meta['machine']}. Run at {meta['when']}; {len(rounds)} interleaved rounds of "
             f"{meta['duration_s']:g} s per point after a 5 s warm-up of each; {meta['args']['streams']} streams of "
             f"{meta['args']['tokens']} tokens at 50 engine steps/s. Medians of the rounds, (min-max); ratios are paired "
             "per round. Gateway CPU: ingress + model replica + proxy (the floor: its one process). With the guard "
             "(`both`) an event is a released window of 16 tokens, so compare per token.", "",
             "| system | events/s | tokens/s | failed | gateway CPU us/event | x floor (paired) | gateway CPU us/token | "
             "ingress us/event | model replica us/event | proxy us/event | Redis scripts/request | host steal % |",
             "|" + "---|" * 12]
    for name in ("floor", "qbt", "qbt+guard", "qbt handle"):
        rs = [by[(n, name)] for n in rounds if (n, name) in by]
        per = lambda k: [r["cpu_s"].get(k, 0) / r["events"] * 1e6 if r["events"] else None for r in rs]  # noqa: E731
        ratio = [by[(n, name)]["gateway_us_per_event"] / by[(n, "floor")]["gateway_us_per_event"]
                 for n in rounds if (n, name) in by and (n, "floor") in by]
        lines.append(f"| {name} | {spread([r['events'] / r['wall_s'] for r in rs])} | "
                     f"{spread([r['tokens'] / r['wall_s'] for r in rs])} | {sum(r['failed'] for r in rs)} "
                     f"| {spread([r['gateway_us_per_event'] for r in rs])} | {spread(ratio)} | "
                     f"{spread([r['gateway_us_per_token'] for r in rs])} | "
                     f"{spread(per('ingress')) if name != 'floor' else '-'} | "
                     f"{spread(per('model replica')) if name != 'floor' else '-'} | "
                     f"{spread(per('proxy')) if name != 'floor' else '-'} | "
                     f"{spread([r['redis_script_calls_per_request'] for r in rs])} | "
                     f"{steal_spread(rs)} |")
    relay = [by[(n, "qbt")]["gateway_us_per_event"] / by[(n, "qbt handle")]["gateway_us_per_event"]
             for n in rounds if (n, "qbt") in by and (n, "qbt handle") in by]
    lines += ["", "`qbt` streams on the relay (`stream_transport: relay`, the default); `qbt handle` is the same stack "
              "with one Serve handle message per engine step. Gateway CPU per event, relay / handle, paired per "
              f"round: {spread(relay)}."]
    ingress = [r["events"] / r["cpu_s"]["ingress"] for n in rounds
               if (r := by.get((n, "qbt"))) and r["cpu_s"].get("ingress")]
    lines += ["", "Events one ingress core sustains at that cost (one second of CPU over the ingress CPU per event, on "
              f"the relay): {spread(ingress, '{:.0f}')} events/s."]
    reqs = [by[(n, "qbt requests")] for n in rounds if (n, "qbt requests") in by]
    lines += ["", "Short whole requests (`max_tokens` 1, concurrency "
              f"{reqs[0]['concurrency'] if reqs else '-'}), guard off:", "",
              "| requests/s | failed | ingress CPU us/request | admitted requests/s per ingress core | "
              "Redis scripts/request | e2e p50 ms | host steal % |", "|---|---|---|---|---|---|---|",
              f"| {spread([r['ok'] / r['wall_s'] for r in reqs])} | {sum(r['failed'] for r in reqs)} | "
              f"{spread([r['ingress_us_per_request'] for r in reqs])} | "
              f"{spread([1e6 / r['ingress_us_per_request'] for r in reqs if r['ingress_us_per_request']])} | "
              f"{spread([r['redis_script_calls_per_request'] for r in reqs])} | "
              f"{spread([r['e2e_p50_ms'] for r in reqs])} | {steal_spread(reqs)} |"]
    def per_request(roles):
        return [sum(r["cpu_s"].get(k, 0) for k in roles) / r["ok"] * 1e6 for r in reqs if r["ok"]]

    stack = ("ingress", "model replica", "guard replica", "proxy", "redis", "ledger exporter", "ray", "other")
    lines += ["", "The same requests' CPU in the rest of the stack, us/request (Ray's own processes: raylet, GCS, "
              "Serve's controller, its agents; runs before the ledger exporter had a role of its own count it "
              "there):", "", "| model replica | Redis | ledger exporter | Ray's own | every process of the stack |",
              "|---|---|---|---|---|",
              f"| {spread(per_request(['model replica']))} | {spread(per_request(['redis']))} | "
              f"{spread(per_request(['ledger exporter']))} | {spread(per_request(['ray']))} | "
              f"{spread(per_request(stack))} |"]
    errors = sorted({e for r in rows for e in r["errors"]})
    if errors:
        lines += ["", "Failures seen: " + "; ".join(errors)]
    return "\n".join(lines) + "\n"


def sim_config(transport: str):
    """The sim profile's Serve config with the given stream transport."""
    import yaml

    config = yaml.safe_load((ROOT / "cluster" / "serve-sim.yaml").read_text())
    config["applications"][0]["args"]["stream_transport"] = transport
    path = RUN_DIR / f"serve-sim-{transport}.yaml"
    RUN_DIR.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--duration", type=float, default=60, help="seconds per point")
    parser.add_argument("--streams", type=int, default=64, help="concurrent streams")
    parser.add_argument("--tokens", type=int, default=256, help="tokens per stream")
    parser.add_argument("--request-concurrency", type=int, default=32)
    parser.add_argument("--out", default="gateway", help="results file stem in benchmarks/results")
    parser.add_argument("--report", action="store_true", help="only re-render the markdown from the JSON")
    args = parser.parse_args()
    if args.report:
        data = json.loads((OUT / f"{args.out}.json").read_text())
        (OUT / f"{args.out}.md").write_text(report(data["runs"], data["meta"]))
        return 0
    become_subreaper()
    systems: dict[str, System] = {}
    try:
        systems["floor"] = System("floor", FLOOR_PORT, "/health",
                                  [PY, "-m", "benchmarks.floor_server", str(FLOOR_PORT)], RUN_DIR)
        keys = {}
        for name, config, port, metrics, redis_url in (
                ("qbt", sim_config("relay"), QBT_PORT, METRICS_PORT, REDIS_URL),
                ("qbt handle", sim_config("handle"), HANDLE_PORT, HANDLE_METRICS_PORT, HANDLE_REDIS_URL)):
            run_dir = RUN_DIR / name.replace(" ", "-")
            systems[name] = System(name.replace(" ", "-"), port, "/health", [
                PY, "-m", "serve_app.ops.cli", "serve", "--config", str(config), "--port", str(port), "--run-dir",
                str(run_dir), "--admin-port", "0"], RUN_DIR,
                {"REDIS_URL": redis_url, "QBT_METRICS_PORT": str(metrics), "QBT_RAY_TEMP_DIR": str(run_dir / "ray")})
            systems[name].wait_ready()  # one at a time: two Ray heads starting at once compete for 2 cores
            keys[name] = bench_keys(redis_url)
            say(f"{name} ready")
            systems[name].pause()
        systems["floor"].wait_ready()
        rows = asyncio.run(measure(args, keys["qbt"], keys["qbt handle"], systems))
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
        for system in systems.values():
            system.stop()
        stop_descendants(grace_s=10)


if __name__ == "__main__":
    sys.exit(main())
