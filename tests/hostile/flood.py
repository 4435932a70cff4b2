"""A short version of `benchmarks/hostile.py`: one customer's streams alone, then the same streams while 32 clients
send 2 MB bodies with invalid keys as fast as they can, alternating. The figure is the customer's inter-token
latency p50 under attack over alone, paired per round (issue #14: it may move by less than 20%). Reported, never
asserted (timings on a 2-core machine are not a test); that every customer stream completed is asserted."""

from __future__ import annotations

import asyncio
import json
import secrets
import statistics
import time

MODEL = "qbt-sim-llm"
STREAMS, ATTACKERS, MAX_TOKENS = 4, 32, 100
BODY_BYTES = 2_000_000


async def customer(host: str, port: int, key: str, deadline: float, gaps: list[float], streams: list[dict]) -> None:
    """Back-to-back streams (a new connection each); the time between consecutive SSE events; each stream's
    outcome, from its events: completed, with usage for every token asked."""
    body = json.dumps({"model": MODEL, "prompt": "The quick brown fox", "max_tokens": MAX_TOKENS, "stream": True,
                       "stream_options": {"include_usage": True}}).encode()
    while time.perf_counter() < deadline:
        reader, writer = await asyncio.open_connection(host, port)
        outcome = {"status": None, "completion_tokens": None, "done": False, "error": None}
        streams.append(outcome)
        try:
            writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Authorization: Bearer " + key.encode() + b"\r\nContent-Length: " +
                         str(len(body)).encode() + b"\r\n\r\n" + body)
            status = int((await reader.readuntil(b"\r\n")).split()[1])
            outcome["status"] = status
            while await reader.readuntil(b"\r\n") != b"\r\n":
                pass
            if status != 200:
                outcome["error"] = (await reader.read(2000)).decode(errors="replace")
                continue
            payload, last = [], None
            while (size := int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)) != 0:
                data = await reader.readexactly(size + 2)
                now = time.perf_counter()
                if last is not None and data.startswith(b"data: {"):
                    gaps.append(now - last)
                last = now
                payload.append(data[:-2])
            read_events(b"".join(payload), outcome)
        except (OSError, asyncio.IncompleteReadError, ValueError) as exc:
            outcome["error"] = type(exc).__name__
        finally:
            writer.close()


def read_events(raw: bytes, outcome: dict) -> None:
    for block in raw.decode().split("\n\n"):
        if not block.startswith("data: "):
            continue
        data = block[len("data: "):]
        if data == "[DONE]":
            outcome["done"] = True
            continue
        event = json.loads(data)
        if "error" in event:
            outcome["error"] = event["error"].get("code")
        if event.get("usage"):
            outcome["completion_tokens"] = event["usage"]["completion_tokens"]


async def attacker(host: str, port: int, deadline: float, statuses: dict[str, int], traced: list[int]) -> None:
    """A new connection per request (a refused body is not read, so the server closes the connection)."""
    body = b'{"model": "' + MODEL.encode() + b'", "prompt": "' + b"x" * (BODY_BYTES - 40) + b'"}'
    while time.perf_counter() < deadline:
        key = "qbt_" + secrets.token_hex(20)
        try:
            reader, writer = await asyncio.open_connection(host, port)
            writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Authorization: Bearer " + key.encode() + b"\r\nContent-Length: " +
                         str(len(body)).encode() + b"\r\n\r\n")
            writer.write(body)
            status = (await asyncio.wait_for(reader.readuntil(b"\r\n"), 30)).split()[1].decode()
            rest = await asyncio.wait_for(reader.read(4000), 5)
            if b"Traceback" in rest or b'File "' in rest:
                traced.append(1)
            writer.close()
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError, IndexError):
            status = "reset"
        statuses[status] = statuses.get(status, 0) + 1


async def phase(host: str, port: int, key: str, hostile: bool, duration_s: float) -> dict:
    deadline = time.perf_counter() + duration_s
    gaps: list[float] = []
    streams: list[dict] = []
    statuses: dict[str, int] = {}
    traced: list[int] = []
    tasks = [customer(host, port, key, deadline, gaps, streams) for _ in range(STREAMS)]
    if hostile:
        tasks += [attacker(host, port, deadline, statuses, traced) for _ in range(ATTACKERS)]
    await asyncio.gather(*tasks)
    gaps.sort()
    return {"hostile": hostile, "streams": streams, "events": len(gaps),
            "itl_p50_ms": gaps[len(gaps) // 2] * 1000 if gaps else None,
            "itl_p99_ms": gaps[int(len(gaps) * 0.99)] * 1000 if gaps else None,
            "attacks": statuses, "attacks_per_s": sum(statuses.values()) / duration_s,
            "tracebacks_in_attack_answers": len(traced)}


def measure(base_url: str, key: str, rounds: int = 2, duration_s: float = 8.0) -> dict:
    host, port = base_url.removeprefix("http://").split(":")
    asyncio.run(phase(host, int(port), key, False, 2.0))  # warm-up; the key becomes known to the ingress
    runs = []
    for _ in range(rounds):
        runs.append(asyncio.run(phase(host, int(port), key, False, duration_s)))
        runs.append(asyncio.run(phase(host, int(port), key, True, duration_s)))
    quiet, hostile = runs[::2], runs[1::2]
    ratios = [h["itl_p50_ms"] / q["itl_p50_ms"] for q, h in zip(quiet, hostile) if h["itl_p50_ms"] and q["itl_p50_ms"]]
    attacks: dict[str, int] = {}
    for h in hostile:
        for status, count in h["attacks"].items():
            attacks[status] = attacks.get(status, 0) + count
    return {"rounds": rounds, "phase_s": duration_s, "streams_per_phase": STREAMS, "attackers": ATTACKERS,
            "itl_p50_alone_ms": statistics.median(q["itl_p50_ms"] for q in quiet),
            "itl_p50_attack_ms": statistics.median(h["itl_p50_ms"] for h in hostile),
            "itl_p99_alone_ms": statistics.median(q["itl_p99_ms"] for q in quiet),
            "itl_p99_attack_ms": statistics.median(h["itl_p99_ms"] for h in hostile),
            "itl_p50_ratio": statistics.median(ratios) if ratios else None, "ratios": ratios,
            "attack_answers": attacks, "attacks_per_s": statistics.median(h["attacks_per_s"] for h in hostile),
            "tracebacks_in_attack_answers": sum(h["tracebacks_in_attack_answers"] for h in hostile),
            "streams": [s for r in runs for s in r["streams"]]}
