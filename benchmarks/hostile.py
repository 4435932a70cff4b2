"""What unauthenticated abuse costs a paying customer: a customer's streams alone, then the same streams while 32
clients send 2 MB bodies with invalid keys as fast as they can, alternating, on the simulated engine through Serve
with real Redis. The figure is the customers' inter-token latency p50, paired per round (issue #14: it may move by
less than 20%).

    .venv/bin/python -m benchmarks.hostile [--rounds 3] [--duration 15]

Writes benchmarks/results/hostile.{json,md}.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import statistics
import sys
import time

from benchmarks.servers import OUT, ROOT, CpuMeter, System, bench_keys, say
from serve_app.ops.launcher import stop_descendants
from serve_app.ops.processes import become_subreaper

RUN_DIR = ROOT / ".run" / "bench-hostile"
REDIS_URL = "redis://127.0.0.1:6396/0"
PORT, METRICS_PORT = 8131, 8132
BODY_BYTES = 2_000_000


async def customer(key: str, deadline: float, gaps: list[float]) -> int:
    """Back-to-back 256-token streams; the time between consecutive SSE events, per stream."""
    body = json.dumps({"model": "qbt-sim-llm", "prompt": "The quick brown fox", "max_tokens": 256,
                       "stream": True}).encode()
    done = 0
    reader, writer = await asyncio.open_connection("127.0.0.1", PORT)
    try:
        while time.perf_counter() < deadline:
            writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Authorization: Bearer " + key.encode() + b"\r\nContent-Length: " +
                         str(len(body)).encode() + b"\r\n\r\n" + body)
            while await reader.readuntil(b"\r\n") != b"\r\n":
                pass
            last = None
            while (size := int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)) != 0:
                data = await reader.readexactly(size + 2)
                now = time.perf_counter()
                if last is not None and data.startswith(b"data: {"):
                    gaps.append(now - last)
                last = now
            await reader.readuntil(b"\r\n")
            done += 1
    finally:
        writer.close()
    return done


async def attacker(deadline: float, statuses: dict[str, int]) -> None:
    """New connection per request (a refused body is not read, so the server closes the connection)."""
    filler = b"x" * (BODY_BYTES - 40)
    while time.perf_counter() < deadline:
        body = b'{"model": "qbt-sim-llm", "prompt": "' + filler + b'"}'
        key = "qbt_" + secrets.token_hex(20)
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", PORT)
            writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Authorization: Bearer " + key.encode() + b"\r\nContent-Length: " +
                         str(len(body)).encode() + b"\r\n\r\n")
            writer.write(body)
            status = (await asyncio.wait_for(reader.readuntil(b"\r\n"), 30)).split()[1].decode()
            writer.close()
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError):
            status = "reset"
        statuses[status] = statuses.get(status, 0) + 1


async def phase(key: str, hostile: bool, duration_s: float, meter: CpuMeter) -> dict:
    deadline = time.perf_counter() + duration_s
    gaps: list[float] = []
    statuses: dict[str, int] = {}
    before = meter.snapshot()
    tasks = [customer(key, deadline, gaps) for _ in range(8)]
    if hostile:
        tasks += [attacker(deadline, statuses) for _ in range(32)]
    results = await asyncio.gather(*tasks)
    cpu = CpuMeter.delta(before, meter.snapshot())
    gaps.sort()
    row = {"hostile": hostile, "streams": sum(results[:8]), "itl_p50_ms": gaps[len(gaps) // 2] * 1000,
           "itl_p99_ms": gaps[int(len(gaps) * 0.99)] * 1000, "events": len(gaps), "attacks": statuses,
           "attacks_per_s": sum(statuses.values()) / duration_s, "ingress_cpu_s": cpu["ingress"]}
    say(f"{'hostile' if hostile else 'quiet  '}: ITL p50 {row['itl_p50_ms']:.1f} ms, p99 {row['itl_p99_ms']:.1f} ms, "
        f"{row['streams']} streams; attacks {statuses}; ingress CPU {cpu['ingress']:.1f} s")
    return row


def report(rows: list[dict], args) -> str:
    ratios = [h["itl_p50_ms"] / q["itl_p50_ms"] for q, h in zip(rows[::2], rows[1::2])]
    quiet, hostile = [r for r in rows if not r["hostile"]], [r for r in rows if r["hostile"]]
    med = lambda xs: f"{statistics.median(xs):.2f} ({min(xs):.2f} to {max(xs):.2f})"  # noqa: E731
    return "\n".join([
        "# A customer's streams under unauthenticated abuse", "",
        f"Command: `.venv/bin/python -m benchmarks.hostile {' '.join(sys.argv[1:])}`; run at "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; {os.cpu_count()} CPUs.", "",
        f"8 customer streams (256 tokens at 50 steps/s, simulated engine through Serve, real Redis), {args.rounds} "
        f"rounds of {args.duration:g} s quiet then {args.duration:g} s with 32 clients sending {BODY_BYTES:,}-byte "
        "bodies with invalid keys; medians over rounds (min to max), the ratio paired per round.", "",
        "| | ITL p50 ms | ITL p99 ms | invalid-key requests/s | their answers | ingress CPU s |", "|---|---|---|---|---|---|",
        f"| quiet | {med([r['itl_p50_ms'] for r in quiet])} | {med([r['itl_p99_ms'] for r in quiet])} | - | - | "
        f"{med([r['ingress_cpu_s'] for r in quiet])} |",
        f"| under abuse | {med([r['itl_p50_ms'] for r in hostile])} | {med([r['itl_p99_ms'] for r in hostile])} | "
        f"{med([r['attacks_per_s'] for r in hostile])} | {hostile[-1]['attacks']} | "
        f"{med([r['ingress_cpu_s'] for r in hostile])} |", "",
        f"ITL p50 under abuse / quiet, paired: **{med(ratios)}** (the target: below 1.20).", ""])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=float, default=15)
    args = parser.parse_args()
    become_subreaper()
    system = None
    try:
        system = System("qbt", PORT, "/health", [
            sys.executable, "-m", "serve_app.ops.cli", "serve", "--config", str(ROOT / "cluster" / "serve-sim.yaml"),
            "--port", str(PORT), "--run-dir", str(RUN_DIR / "qbt")], RUN_DIR,
            {"REDIS_URL": REDIS_URL, "QBT_METRICS_PORT": str(METRICS_PORT), "QBT_RAY_TEMP_DIR": str(RUN_DIR / "ray")})
        system.wait_ready()
        key, meter = bench_keys(REDIS_URL)["off"], CpuMeter([system])
        asyncio.run(phase(key, False, 5, meter))  # warm-up
        rows = []
        for _ in range(args.rounds):
            rows.append(asyncio.run(phase(key, False, args.duration, meter)))
            rows.append(asyncio.run(phase(key, True, args.duration, meter)))
        OUT.mkdir(parents=True, exist_ok=True)
        (OUT / "hostile.json").write_text(json.dumps({"args": vars(args), "runs": rows}, indent=1))
        text = report(rows, args)
        (OUT / "hostile.md").write_text(text)
        print(text)
        return 0
    finally:
        if system is not None:
            system.stop()
        stop_descendants(grace_s=10)


if __name__ == "__main__":
    sys.exit(main())
