"""An OpenAI completions load generator: N requests at concurrency C, streaming or not, timing each request on
the client (time to first token, inter-token latency, end to end)."""

from __future__ import annotations

import asyncio
import json
import statistics
import time
from dataclasses import dataclass, field

import httpx


@dataclass
class Sample:
    ok: bool
    ttft: float = 0.0
    e2e: float = 0.0
    tokens: int = 0
    itl: list[float] = field(default_factory=list)


@dataclass
class Result:
    system: str
    stream: bool
    concurrency: int
    requests: int
    wall: float
    samples: list[Sample]

    def summary(self) -> dict:
        ok = [s for s in self.samples if s.ok]
        ttft = sorted(s.ttft for s in ok)
        e2e = sorted(s.e2e for s in ok)
        itl = [x for s in ok for x in s.itl]
        tokens = sum(s.tokens for s in ok)

        def pct(xs, p):
            return xs[min(len(xs) - 1, int(p * len(xs)))] * 1000 if xs else None

        return {"system": self.system, "stream": self.stream, "concurrency": self.concurrency,
                "requests": self.requests, "failed": self.requests - len(ok),
                "output_tok_s": tokens / self.wall, "req_s": len(ok) / self.wall,
                "ttft_p50_ms": pct(ttft, 0.5), "ttft_p99_ms": pct(ttft, 0.99),
                "itl_p50_ms": statistics.median(itl) * 1000 if itl else None,
                "e2e_p50_ms": pct(e2e, 0.5), "e2e_p99_ms": pct(e2e, 0.99)}


async def one(client: httpx.AsyncClient, url: str, body: dict, stream: bool) -> Sample:
    start = time.perf_counter()
    try:
        if not stream:
            res = await client.post(url, json=body)
            end = time.perf_counter()
            if res.status_code != 200:
                return Sample(False)
            tokens = res.json()["usage"]["completion_tokens"]
            return Sample(True, ttft=end - start, e2e=end - start, tokens=tokens)
        sample, last = Sample(True), None
        async with client.stream("POST", url, json={**body, "stream": True,
                                                    "stream_options": {"include_usage": True}}) as res:
            if res.status_code != 200:
                return Sample(False)
            async for line in res.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                now = time.perf_counter()
                chunk = json.loads(line[6:])
                if chunk.get("usage"):
                    sample.tokens = chunk["usage"]["completion_tokens"]
                if not chunk.get("choices"):
                    continue
                if last is None:
                    sample.ttft = now - start
                else:
                    sample.itl.append(now - last)
                last = now
        sample.e2e = time.perf_counter() - start
        return sample
    except httpx.HTTPError:
        return Sample(False)


async def run(system: str, base_url: str, headers: dict, model: str, stream: bool, concurrency: int,
              requests: int, max_tokens: int) -> Result:
    body = {"model": model, "prompt": "The quick brown fox", "max_tokens": max_tokens, "ignore_eos": True,
            "temperature": 1.0}
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=base_url, headers=headers, timeout=300, limits=limits) as client:
        queue: asyncio.Queue = asyncio.Queue()
        for _ in range(requests):
            queue.put_nowait(None)
        samples: list[Sample] = []

        async def worker():
            while not queue.empty():
                queue.get_nowait()
                samples.append(await one(client, "/v1/completions", body, stream))

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - start
    return Result(system, stream, concurrency, requests, wall, samples)
