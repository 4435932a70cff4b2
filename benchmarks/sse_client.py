"""A lean HTTP/1.1 client for the gateway benchmark: it counts SSE events without parsing them, so that the load
generator's own CPU (on the same cores as the system under test) stays small next to the gateway's.

Each worker keeps one keep-alive connection. A request is a failure when its status is not 200, when an in-band
error event arrives, or when its usage does not report the tokens asked for (the audit's silent cases).
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import asdict, dataclass


@dataclass(slots=True)
class Sample:
    ok: bool
    start: float = 0.0  # perf_counter seconds, relative to the run's start
    ttft: float = 0.0
    e2e: float = 0.0
    events: int = 0  # SSE events with choices (the usage chunk and [DONE] excluded)
    tokens: int = 0
    error: str = ""

    def row(self) -> dict:
        return asdict(self)


class Connection:
    def __init__(self, host: str, port: int):
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def _open(self) -> None:
        if self.writer is None or self.writer.is_closing():
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None

    async def post(self, path: str, body: bytes, headers: dict[str, str], expect_tokens: int, stream: bool,
                   t0: float) -> Sample:
        sample = Sample(False, start=time.perf_counter() - t0)
        start = time.perf_counter()
        try:
            await self._open()
            head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
            self.writer.write(f"POST {path} HTTP/1.1\r\nHost: {self.host}\r\nContent-Type: application/json\r\n"
                              f"Content-Length: {len(body)}\r\n{head}\r\n".encode() + body)
            status, length, chunked, keep = await self._head()
            payload = b""
            if chunked:
                async for part in self._chunks():  # the tail is kept: the usage chunk and [DONE] end the stream
                    if not sample.ttft and b'"text"' in part:
                        sample.ttft = time.perf_counter() - start
                    sample.events += part.count(b"data: ")
                    payload = (payload + part)[-4096:]
                sample.events -= 2  # the usage chunk and [DONE]
            else:
                payload += await self.reader.readexactly(length)
                sample.ttft = time.perf_counter() - start
            sample.e2e = time.perf_counter() - start
            if not keep:
                self.close()
            return self._judge(sample, status, payload, expect_tokens, stream)
        except (OSError, asyncio.IncompleteReadError, ValueError) as exc:
            self.close()
            sample.error = f"{type(exc).__name__}: {exc}"[:200]
            return sample

    async def _head(self) -> tuple[int, int, bool, bool]:
        status_line = await self.reader.readuntil(b"\r\n")
        status = int(status_line.split()[1])
        length, chunked, keep = 0, False, True
        while (line := await self.reader.readuntil(b"\r\n")) != b"\r\n":
            name, _, value = line.decode("latin-1").partition(":")
            name, value = name.strip().lower(), value.strip().lower()
            if name == "content-length":
                length = int(value)
            elif name == "transfer-encoding" and "chunked" in value:
                chunked = True
            elif name == "connection" and value == "close":
                keep = False
        return status, length, chunked, keep

    async def _chunks(self):
        while True:
            size = int((await self.reader.readuntil(b"\r\n")).split(b";")[0], 16)
            if size == 0:
                await self.reader.readuntil(b"\r\n")
                return
            data = await self.reader.readexactly(size + 2)
            yield data[:-2]

    @staticmethod
    def _judge(sample: Sample, status: int, payload: bytes, expect_tokens: int, stream: bool) -> Sample:
        if status != 200:
            sample.error = f"HTTP {status}: {payload[:200]!r}"
            return sample
        if stream:
            if b'data: {"error"' in payload:
                sample.error = "in-band error event"
                return sample
            usage = payload.rfind(b'"usage":{')
            if usage < 0 or not payload.rstrip().endswith(b"data: [DONE]"):
                sample.error = "stream ended without usage or [DONE]"
                return sample
            end = payload.index(b"}", usage)
            sample.tokens = json.loads(payload[usage + 8:end + 1])["completion_tokens"]
        else:
            body = json.loads(payload)
            sample.tokens = body["usage"]["completion_tokens"]
            sample.events = 1
        if sample.tokens != expect_tokens:
            sample.error = f"usage reports {sample.tokens} tokens, {expect_tokens} asked"
            return sample
        sample.ok = True
        return sample


async def closed_loop(host: str, port: int, body: dict, headers: dict[str, str], concurrency: int,
                      duration_s: float, max_requests: int | None = None) -> tuple[list[Sample], float]:
    """`concurrency` workers send back to back for `duration_s` (or until `max_requests` were sent)."""
    raw = json.dumps(body).encode()
    stream = bool(body.get("stream"))
    samples: list[Sample] = []
    sent = 0
    t0 = time.perf_counter()
    deadline = t0 + duration_s

    async def worker():
        nonlocal sent
        conn = Connection(host, port)
        try:
            while time.perf_counter() < deadline and (max_requests is None or sent < max_requests):
                sent += 1
                samples.append(await conn.post("/v1/completions", raw, headers, body["max_tokens"], stream, t0))
        finally:
            conn.close()

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return samples, time.perf_counter() - t0


async def head_of_line(port: int, headers: dict[str, str], model: str, request_id: str | None = None
                       ) -> tuple[Sample, Sample]:
    """One head-of-line trial: a 2-token whole request sent 0.4 s into a 480-token stream, each on its own
    connection; (the short request's sample, the stream's)."""
    long_body = json.dumps({"model": model, "prompt": "Once upon a time", "max_tokens": 480, "ignore_eos": True,
                            "stream": True, "stream_options": {"include_usage": True}}).encode()
    short_body = json.dumps({"model": model, "prompt": "Hi", "max_tokens": 2, "ignore_eos": True}).encode()
    short_headers = {**headers, "x-request-id": request_id} if request_id else headers
    a, b = Connection("127.0.0.1", port), Connection("127.0.0.1", port)
    try:
        t0 = time.perf_counter()
        long = asyncio.ensure_future(a.post("/v1/completions", long_body, headers, 480, True, t0))
        await asyncio.sleep(0.4)
        short = await b.post("/v1/completions", short_body, short_headers, 2, False, t0)
        return short, await long
    finally:
        a.close()
        b.close()
