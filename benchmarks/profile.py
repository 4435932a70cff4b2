"""Where the time goes: CPU seconds per process role for the same streaming load on this service and on bare vLLM,
and a py-spy profile of the ingress and the model replica, both under load.

    .venv/bin/python -m benchmarks.profile [--rounds 2] [--concurrency 16] [--requests 128]

Writes benchmarks/results/profile.md (raw py-spy stacks in benchmarks/results/raw/). On a machine whose CPUs the
engine also needs, every CPU second spent outside the engine is throughput lost, so CPU per output token is the
figure.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import os
import subprocess
import sys
import time
from pathlib import Path

import psutil

from benchmarks.compare import LOGS, OUT, PORTS, PY, bench_key, say, session, start_qbt, start_vllm, wait_ready
from benchmarks.load import run

MODEL = "qbt-dev-llm"
ROLES = (("ServeReplica:qbt:Ingress", "ingress replica"), ("ServeReplica:qbt:model-qbt-dev-llm", "model replica"),
         ("ServeReplica:qbt:model-qbt-dev-guard", "guard replica"), ("ProxyActor", "Serve proxy"),
         ("ServeController", "Serve controller"), ("raylet", "raylet"), ("gcs_server", "GCS"),
         ("redis-server", "Redis"), ("EngineCore", "engine core"), ("VLLM::Worker", "engine worker"),
         ("vllm.entrypoints.openai.api_server", "vLLM API server"))
SPY = {"ingress replica": "ingress", "model replica": "replica"}


def role(p: psutil.Process) -> str:
    try:
        text = " ".join(p.cmdline()) or p.name()
    except psutil.Error:
        return "gone"
    for needle, name in ROLES:
        if needle in text:
            if name in ("engine core", "engine worker") and _under_guard(p):
                return "guard " + name
            return name
    return "qubittron launcher" if "serve_app.ops.cli" in text or "bin/qbt" in text else "other Ray processes"


def _under_guard(p: psutil.Process) -> bool:
    try:
        return any("model-qbt-dev-guard" in " ".join(a.cmdline()) for a in p.parents())
    except psutil.Error:
        return False


def cpu_by_role(root: psutil.Process) -> dict[str, float]:
    out: dict[str, float] = collections.Counter()
    for p in [root, *root.children(recursive=True)]:
        try:
            t = p.cpu_times()
            out[role(p)] += t.user + t.system
        except psutil.Error:
            continue
    return out


def self_cpu() -> float:
    t = psutil.Process().cpu_times()
    return t.user + t.system


async def measured(name: str, root: psutil.Process, url: str, headers: dict, c: int, n: int) -> dict:
    before, client_before = cpu_by_role(root), self_cpu()
    res = await run(name, url, headers, MODEL, True, c, n, 32)
    after, client = cpu_by_role(root), self_cpu() - client_before
    tokens = sum(s.tokens for s in res.samples if s.ok)
    roles = {k: after[k] - before.get(k, 0.0) for k in after if after[k] - before.get(k, 0.0) > 0.005}
    roles["load client (this process)"] = client
    return {"system": name, "tokens": tokens, "wall": res.wall, "summary": res.summary(), "cpu": roles}


def spy(pid: int, seconds: int, out: Path) -> subprocess.Popen:
    return subprocess.Popen([str(Path(PY).parent / "py-spy"), "record", "--pid", str(pid), "--duration",
                             str(seconds), "--rate", "200", "--nonblocking", "--format", "raw", "--output", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)


def top_frames(path: Path, limit: int = 18) -> list[tuple[float, str]]:
    """Inclusive share of samples per frame of our code, vLLM, Ray Serve, gRPC and Starlette."""
    stacks, total = [], 0
    for line in path.read_text().splitlines():
        if line.strip():
            stack, n = line.rsplit(" ", 1)
            stacks.append((stack.split(";"), int(n)))
            total += int(n)
    incl: collections.Counter = collections.Counter()
    for frames, n in stacks:
        for f in {_short(f) for f in frames}:
            incl[f] += n
    skip = ("threading.py", "default_worker.py", "worker.py)", "events.py", "base_events.py")
    ranked = [(c * 100 / total, f) for f, c in incl.most_common() if not any(s in f for s in skip)]
    return [("samples", str(total))] + ranked[:limit] if total else []


def _short(frame: str) -> str:
    name, _, loc = frame.partition(" (")
    parts = loc.rstrip(")").rsplit(":", 1)[0].split("/")
    return f"{name} ({'/'.join(parts[-2:])})"


def report(rows: list[dict], spies: dict[str, list], meta: str) -> str:
    lines = ["# Where the time goes", "", meta, "",
             "CPU milliseconds per 1000 output tokens, by process role, same streaming load (median of rounds):",
             ""]
    systems = sorted({r["system"] for r in rows})
    per: dict[str, dict[str, list[float]]] = {s: collections.defaultdict(list) for s in systems}
    tok_s: dict[str, list[float]] = collections.defaultdict(list)
    for r in rows:
        for k, v in r["cpu"].items():
            per[r["system"]][k].append(v * 1e6 / max(r["tokens"], 1))
        per[r["system"]]["total"].append(sum(r["cpu"].values()) * 1e6 / max(r["tokens"], 1))
        tok_s[r["system"]].append(r["summary"]["output_tok_s"])
    names = sorted({k for s in systems for k in per[s]}, key=lambda k: (k == "total", k))
    lines += ["| role | " + " | ".join(systems) + " |", "|---|" + "---|" * len(systems)]
    for k in names:
        cells = [f"{_median(per[s][k]):.0f}" if per[s].get(k) else "-" for s in systems]
        lines.append(f"| {k} | " + " | ".join(cells) + " |")
    lines.append("| output tokens/s | " + " | ".join(f"{_median(tok_s[s]):.0f}" for s in systems) + " |")
    for name, frames in spies.items():
        lines += ["", f"## py-spy: {name} (inclusive share of on-CPU samples)", "", "| share | frame |", "|---|---|"]
        lines += [f"| {a} | {b} |" if isinstance(a, str) else f"| {a:.1f}% | {b} |" for a, b in frames]
    return "\n".join(lines) + "\n"


def _median(xs: list[float]) -> float:
    xs = sorted(xs)
    return xs[len(xs) // 2] if xs else 0.0


async def main_async(args, qbt: psutil.Process, vllm: psutil.Process, key: str) -> tuple[list, dict]:
    targets = {"qbt": (qbt, f"http://127.0.0.1:{PORTS['qbt']}", {"Authorization": f"Bearer {key}"}),
               "vllm": (vllm, f"http://127.0.0.1:{PORTS['vllm']}", {})}
    for name, (_, url, headers) in targets.items():
        await run(name, url, headers, MODEL, True, 4, 8, 16)
    rows = []
    for rnd in range(args.rounds):
        for name in (list(targets) if rnd % 2 == 0 else list(reversed(targets))):
            root, url, headers = targets[name]
            row = await measured(name, root, url, headers, args.concurrency, args.requests)
            say(f"round {rnd + 1} {name}: {row['summary']['output_tok_s']:.0f} tok/s, "
                f"{sum(row['cpu'].values()) * 1e6 / max(row['tokens'], 1):.0f} CPU ms per 1000 tokens")
            rows.append(row)
    procs = {role(p): p.pid for p in qbt.children(recursive=True) if role(p) in SPY}
    spies = {name: spy(pid, args.spy_seconds, LOGS / f"profile-{SPY[name]}.txt") for name, pid in procs.items()}
    _, url, headers = targets["qbt"]
    deadline = time.monotonic() + args.spy_seconds
    while time.monotonic() < deadline:
        await run("qbt", url, headers, MODEL, True, args.concurrency, args.concurrency * 2, 32)
    for p in spies.values():
        p.wait(60)
    return rows, {name: top_frames(LOGS / f"profile-{SPY[name]}.txt") for name in spies}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--requests", type=int, default=128)
    parser.add_argument("--spy-seconds", type=int, default=20)
    args = parser.parse_args()
    with session() as procs:
        procs += [start_qbt(), start_vllm()]
        wait_ready("vllm", f"http://127.0.0.1:{PORTS['vllm']}/v1/models", {}, procs[1])
        wait_ready("qbt", f"http://127.0.0.1:{PORTS['qbt']}/health", {}, procs[0])
        key = bench_key()
        rows, spies = asyncio.run(main_async(args, psutil.Process(procs[0].pid), psutil.Process(procs[1].pid),
                                             key))
        meta = (f"Command: `.venv/bin/python -m benchmarks.profile {' '.join(sys.argv[1:])}`; streaming, "
                f"concurrency {args.concurrency}, {args.requests} requests x 32 tokens per round, {args.rounds} "
                f"rounds; {os.cpu_count()} CPUs; run at {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.")
        text = report(rows, spies, meta)
        (OUT / "profile.md").write_text(text)
        print(text)
        return 0


if __name__ == "__main__":
    sys.exit(main())
