"""Memory: the ingress replica's resident memory per concurrent stream, and a bounded soak showing whether it grows.

    .venv/bin/python -m benchmarks.soak [--minutes 10] [--concurrency 32] [--streams 64]

1. Per stream: RSS of the ingress with no request, then with `--streams` slow streams held open at once; the
   difference divided by the streams.
2. Soak: `--concurrency` streaming clients for `--minutes`, RSS of the ingress and the model replica sampled every
   10 s; compares the first and the last minute. Writes benchmarks/results/soak.md.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time

import httpx
import psutil

from benchmarks.load import run
from benchmarks.servers import OUT, ROOT, System, bench_keys, role, say
from serve_app.ops.launcher import stop_descendants
from serve_app.ops.processes import become_subreaper

MODEL = "qbt-dev-llm"
PORT, REDIS_URL = 8101, "redis://127.0.0.1:6398/0"
MIB = 1024 * 1024


def processes(root: psutil.Process) -> dict[str, psutil.Process]:
    return {role(p): p for p in root.children(recursive=True) if role(p) in ("ingress", "model replica")}


def rss(p: psutil.Process) -> float:
    return p.memory_info().rss / MIB


async def held_open(url: str, key: str, streams: int, ingress: psutil.Process) -> tuple[float, float]:
    """RSS with `streams` streams open at once (each has sent its first chunk and is still generating)."""
    opened = asyncio.Event()
    started = 0
    body = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 400, "ignore_eos": True, "stream": True}

    async def one(client: httpx.AsyncClient):
        nonlocal started
        async with client.stream("POST", "/v1/completions", json=body) as res:
            lines = res.aiter_lines()
            await anext(lines)
            started += 1
            if started == streams:
                opened.set()
            async for _ in lines:
                pass

    limits = httpx.Limits(max_connections=streams)
    async with httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=600,
                                 limits=limits) as client:
        tasks = [asyncio.create_task(one(client)) for _ in range(streams)]
        await asyncio.wait_for(opened.wait(), 300)
        peak = rss(ingress)
        await asyncio.gather(*tasks)
    return peak, rss(ingress)


async def soak(url: str, key: str, minutes: float, concurrency: int, procs: dict[str, psutil.Process]) -> dict:
    samples: dict[str, list[tuple[float, float]]] = {name: [] for name in procs}
    stop = time.monotonic() + minutes * 60
    served = {"requests": 0, "failed": 0}

    async def sampler():
        start = time.monotonic()
        while time.monotonic() < stop:
            for name, p in procs.items():
                samples[name].append((time.monotonic() - start, rss(p)))
            await asyncio.sleep(10)

    async def load():
        while time.monotonic() < stop:
            res = await run("qbt", url, {"Authorization": f"Bearer {key}"}, MODEL, True, concurrency,
                            concurrency * 4, 32)
            served["requests"] += res.requests
            served["failed"] += res.requests - sum(s.ok for s in res.samples)

    await asyncio.gather(sampler(), load())
    return {"samples": samples, **served}


def report(args, idle: float, peak: float, after: float, soaked: dict) -> str:
    per_stream = (peak - idle) / args.streams
    lines = ["# Memory and soak", "",
             f"Command: `.venv/bin/python -m benchmarks.soak {' '.join(sys.argv[1:])}`; run at "
             f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.", "",
             f"Ingress replica RSS: {idle:.0f} MiB idle, {peak:.0f} MiB with {args.streams} streams open, "
             f"{after:.0f} MiB after they ended: **{per_stream * 1024:.0f} KiB per concurrent stream**.", "",
             f"Soak: {args.concurrency} concurrent streaming clients for {args.minutes:g} minutes, "
             f"{soaked['requests']} requests, {soaked['failed']} failed.", "",
             "| process | first minute MiB (median) | last minute MiB (median) | change MiB | max MiB |",
             "|---|---|---|---|---|"]
    for name, points in soaked["samples"].items():
        end = points[-1][0]
        first = statistics.median(v for t, v in points if t <= 60)
        last = statistics.median(v for t, v in points if t >= end - 60)
        lines.append(f"| {name} | {first:.0f} | {last:.0f} | {last - first:+.0f} | {max(v for _, v in points):.0f} |")
    lines += ["", "Samples (seconds, MiB):", ""]
    for name, points in soaked["samples"].items():
        lines.append(f"- {name}: " + ", ".join(f"{t:.0f}s {v:.0f}" for t, v in points))
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--minutes", type=float, default=10)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--streams", type=int, default=64)
    args = parser.parse_args()
    become_subreaper()
    system = None
    try:
        system = System("qbt", PORT, "/health", [sys.executable, "-m", "serve_app.ops.cli", "serve", "--port", str(PORT),
                                                 "--run-dir", str(ROOT / ".run" / "bench-soak")],
                        ROOT / ".run" / "bench-soak", {"REDIS_URL": REDIS_URL, "QBT_METRICS_PORT": "8181"})
        system.wait_ready()
        url = f"http://127.0.0.1:{PORT}"
        key = bench_keys(REDIS_URL)["off"]
        replicas = processes(psutil.Process(system.proc.pid))
        ingress = replicas["ingress"]
        asyncio.run(run("qbt", url, {"Authorization": f"Bearer {key}"}, MODEL, True, 8, 32, 16))
        idle = rss(ingress)
        say(f"ingress idle {idle:.0f} MiB; opening {args.streams} streams")
        peak, after = asyncio.run(held_open(url, key, args.streams, ingress))
        say(f"ingress {peak:.0f} MiB with the streams open, {after:.0f} MiB after; soaking {args.minutes:g} min")
        soaked = asyncio.run(soak(url, key, args.minutes, args.concurrency, replicas))
        text = report(args, idle, peak, after, soaked)
        (OUT / "soak.md").write_text(text)
        print(text)
        return 0
    finally:
        if system is not None:
            system.stop()
        stop_descendants(grace_s=10)


if __name__ == "__main__":
    sys.exit(main())
