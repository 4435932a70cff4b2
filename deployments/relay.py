"""The stream relay: a stream's tokens after its first item leave the model replica as bytes on a socket of their
own, not as one Serve handle message per engine step.

Why: each item crossing a Serve handle costs a gRPC message, a pickle and Serve's bookkeeping on both sides, per
engine step per stream: most of the gateway's CPU per token (benchmarks/results/gateway.md). Here the replica
writes each item as a small frame (its rendered choices JSON and the cumulative completion tokens, for the meter)
into a socket, and the ingress reads whatever has arrived and sends it to the client in one write.

How: the first item still comes through the handle (refusals, the input guard and errors before any byte keep
their path); the replica then yields a ticket (host, port, 16 random bytes) and waits for the ingress to connect
with it. The handle's stream stays open and idle meanwhile, so Serve's cancellation still reaches the engine: the
ingress cancels it when the client leaves, and Serve cancels it when the ingress dies. Only rendered streams
(no output gate reading the choices) take this path. The ticket crosses the handle, Ray's authenticated channel;
the socket carries nothing to anyone without it. Kept free of vLLM imports: the ingress imports it too."""

from __future__ import annotations

import asyncio
import os
import socket
import struct
from dataclasses import dataclass

from deployments.wire import EngineFailure, GenerationRequest, InvalidSampling, outgoing

HEADER = struct.Struct("!IIB")  # payload bytes, cumulative completion tokens, kind
DATA, END, INVALID, FAILED = 0, 1, 2, 3
TICKET_BYTES = 16
# How long a replica waits for the ingress to come for a stream: the ingress connects once the input guard has
# passed the prompt (its timeout is 10 s by default), so well beyond that; a dead ingress is Serve's to cancel.
CONNECT_S = 120.0
END_DRAIN_S = 30.0  # how long a finished stream's last bytes may wait for a slow reader before the socket closes
HIGH_WATER = 1 << 20  # bytes a replica lets queue for a slow reader before it waits
READ_BYTES = 1 << 18


@dataclass(frozen=True, slots=True)
class Ticket:
    host: str
    port: int
    secret: bytes

    def as_wire(self) -> tuple:
        return ("relay", self.host, self.port, self.secret)


def ticket_of(raw) -> Ticket | None:
    """The ticket, if this handle item is one (a plain tuple, as every item crossing the handle)."""
    if type(raw) is tuple and len(raw) == 4 and raw[0] == "relay":
        return Ticket(raw[1], raw[2], raw[3])
    return None


class RelayServer:
    """In the model replica: one listening socket; each connection brings a ticket and gets that stream's frames."""

    def __init__(self, host: str):
        self.host = host
        self.port = 0
        self._expected: dict[bytes, asyncio.Future] = {}
        self._server: asyncio.AbstractServer | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    async def start(self) -> RelayServer:
        """Listens on this loop (once; again on another loop, as tests run one per test)."""
        loop = asyncio.get_running_loop()
        if self._server is None or self._loop is not loop:
            self._server, self._loop = await asyncio.start_server(self._accept, self.host, 0), loop
            self.port = self._server.sockets[0].getsockname()[1]
        return self

    def expect(self) -> tuple[Ticket, asyncio.Future]:
        secret = os.urandom(TICKET_BYTES)
        waiter = asyncio.get_running_loop().create_future()
        self._expected[secret] = waiter
        waiter.add_done_callback(lambda _: self._expected.pop(secret, None))
        return Ticket(self.host, self.port, secret), waiter

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            secret = await asyncio.wait_for(reader.readexactly(TICKET_BYTES), CONNECT_S)
        except (asyncio.IncompleteReadError, TimeoutError, ConnectionError):
            writer.close()
            return
        waiter = self._expected.get(secret)
        if waiter is None or waiter.done():
            writer.close()
            return
        waiter.set_result(Sink(writer))

    def close(self) -> None:
        if self._server is not None:
            self._server.close()


class Sink:
    """One stream's side of the socket in the replica."""

    def __init__(self, writer: asyncio.StreamWriter):
        self.writer = writer
        self.transport = writer.transport

    async def send(self, payload: bytes, completion_tokens: int) -> None:
        """Raises ConnectionError when the ingress has gone (the client left): the replica stops generating."""
        if self.transport.is_closing():
            raise ConnectionResetError("the ingress closed the stream")
        self.transport.write(HEADER.pack(len(payload), completion_tokens, DATA) + payload)
        if self.transport.get_write_buffer_size() > HIGH_WATER:
            await self.writer.drain()

    async def end(self, completion_tokens: int, kind: int = END, message: str = "") -> None:
        """The end (or error) frame, then what is still buffered for a slow reader, then close: the request stays
        in flight for Serve (a replica being stopped waits for it) until its last bytes have left."""
        if not self.transport.is_closing():
            body = message.encode()[:4096]
            self.transport.write(HEADER.pack(len(body), completion_tokens, kind) + body)
            try:
                await asyncio.wait_for(self.writer.drain(), END_DRAIN_S)
            except (ConnectionError, TimeoutError):
                pass
        self.writer.close()


@dataclass(slots=True)
class Progress:
    """How far a stream got, for the replica's count of abandoned work."""

    produced: int = 0
    ended: bool = False
    relayed: bool = False  # the ingress came for the rest on the relay's socket


async def served(items, req: GenerationRequest, relay: RelayServer | None, progress: Progress):
    """The model replica's side of a stream: what crosses the handle (`wire.outgoing` tuples): every item, or for a
    relayed stream the first one, then the ticket, then nothing more while the rest goes on the socket. The engine's
    generator is closed however this ends (cancelled, the ingress gone, an error), which aborts its request."""
    sink = waiter = None
    try:
        async for item in items:
            progress.produced = item.usage.completion_tokens
            if sink is not None:
                await sink.send(*outgoing(item, req))
                continue
            yield outgoing(item, req)
            if req.relay and relay is not None:
                ticket, waiter = (await relay.start()).expect()
                yield ticket.as_wire()
                sink = await asyncio.wait_for(waiter, CONNECT_S)
                progress.relayed = True
        progress.ended = True
        if sink is not None:
            await sink.end(progress.produced)
    except (ConnectionError, TimeoutError):  # the ingress went away (or never came): nobody to send to
        if sink is None:
            raise
    except Exception as exc:
        if sink is None:
            raise
        await sink.end(progress.produced, INVALID if isinstance(exc, InvalidSampling) else FAILED, str(exc))
    finally:
        if waiter is not None and not waiter.done():  # closed before the ingress came: the ticket opens nothing
            waiter.cancel()
        await items.aclose()
        if sink is not None:
            sink.writer.close()


def keepalive(writer: asyncio.StreamWriter) -> None:
    """A replica whose node vanished sends no reset: TCP keepalive probes find it within about 25 s (a live peer's
    kernel answers them, however slow its engine), so the read fails instead of waiting for the request bound."""
    sock = writer.get_extra_info("socket")
    if sock is None:
        return
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for option, value in (("TCP_KEEPIDLE", 10), ("TCP_KEEPINTVL", 5), ("TCP_KEEPCNT", 3)):
        if hasattr(socket, option):
            sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, option), value)


class RelayClosed(ConnectionError):
    """The replica's side ended without an end frame (the replica died)."""


async def frames(ticket: Ticket):
    """In the ingress: the stream's frames as they arrive, in batches (one batch per socket read): lists of
    (payload, cumulative completion tokens). Ends at the end frame; an error frame raises `(kind, message)` as
    the engine's error (InvalidSampling or EngineFailure), a socket that closes early raises RelayClosed. Closing this generator closes the socket, which
    the replica sees at its next write."""
    reader, writer = await asyncio.wait_for(asyncio.open_connection(ticket.host, ticket.port), CONNECT_S)
    keepalive(writer)
    try:
        writer.write(ticket.secret)
        buffer = b""
        while True:
            data = await reader.read(READ_BYTES)
            if not data:
                raise RelayClosed("the model replica closed the stream")
            buffer += data
            batch, offset, size = [], 0, len(buffer)
            while size - offset >= HEADER.size:
                length, tokens, kind = HEADER.unpack_from(buffer, offset)
                start = offset + HEADER.size
                if size - start < length:
                    break
                payload = buffer[start:start + length]
                offset = start + length
                if kind == DATA:
                    batch.append((payload, tokens))
                    continue
                if batch:
                    yield batch
                if kind == END:
                    return
                raise (InvalidSampling if kind == INVALID else EngineFailure)(payload.decode(errors="replace"))
            buffer = buffer[offset:]
            if batch:
                yield batch
    finally:
        writer.close()

