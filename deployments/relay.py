"""The stream relay: a stream's tokens after its first item leave the model replica as bytes on a connection shared
by the streams between one ingress and one replica, not as one Serve handle message per engine step.

Why: each item crossing a Serve handle costs a gRPC message, a pickle and Serve's bookkeeping on both sides, per
engine step per stream: most of the gateway's CPU per token (benchmarks/results/gateway.md). Here the replica
writes each item as a small frame (the stream's id, its rendered choices JSON and the cumulative completion tokens,
for the meter). The frames of every stream that one engine step produced leave in one write (queued, then flushed
once the loop has run the step's wakeups: no timer), and the ingress reads them in one read, then gives each
stream whatever has arrived for it, which it sends to its client in one write.

How: the first item still comes through the handle (refusals, the input guard and errors before any byte keep
their path); the replica then yields a ticket (host, port, 16 random bytes) and waits for the ingress to claim it
on its connection to that replica. The handle's stream stays open and idle meanwhile, so Serve's cancellation still
reaches the engine: the ingress cancels it when the client leaves (and sends a cancel for the stream), and Serve
cancels it when the ingress dies (whose connection closing stops every stream on it). Only rendered streams (no
output gate reading the choices) take this path. The ticket crosses the handle, Ray's authenticated channel; the
connection carries nothing to anyone without it. The ingress's side is `serve_app/serving/relaying.py`; the wire
format is here, for both. Kept free of vLLM imports: the ingress imports it too."""

from __future__ import annotations

import asyncio
import os
import socket
import struct
from dataclasses import dataclass

from deployments.wire import GenerationRequest, InvalidSampling, outgoing

HEADER = struct.Struct("!IIIB")  # replica -> ingress: stream id, payload bytes, cumulative completion tokens, kind
DATA, END, INVALID, FAILED, REFUSED, ABORTED = 0, 1, 2, 3, 4, 5
CONTROL = struct.Struct("!BI")  # ingress -> replica: kind, stream id (a claim is followed by the ticket's secret)
CLAIM, CANCEL = 0, 1
TICKET_BYTES = 16
# How long a replica waits for the ingress to come for a stream: the ingress claims it once the input guard has
# passed the prompt (its timeout is 10 s by default), so well beyond that; a dead ingress is Serve's to cancel.
CONNECT_S = 120.0
END_DRAIN_S = 30.0  # how long a finished stream's last bytes may wait for a slow reader
HIGH_WATER = 1 << 20  # bytes a replica lets queue on a connection before its streams wait
MAX_MESSAGE = 1 << 24  # a frame longer than this is not the relay speaking: the connection is dropped
MAX_REFUSALS = 64  # unknown tickets one connection may present before it is dropped


@dataclass(frozen=True, slots=True)
class Ticket:
    host: str
    port: int
    secret: bytes

    def as_wire(self) -> tuple:
        return ("relay", self.host, self.port, self.secret)


def ticket_of(wire) -> Ticket | None:
    """The ticket a relayed stream's first item carries (`StreamItem.relay`: a plain tuple, as everything crossing
    the handle), or None."""
    if type(wire) is tuple and len(wire) == 4 and wire[0] == "relay":
        return Ticket(wire[1], wire[2], wire[3])
    return None


def keepalive(transport: asyncio.BaseTransport) -> None:
    """A peer whose node vanished sends no reset: TCP keepalive probes find it within about 25 s (a live peer's
    kernel answers them, however slow its engine), so the streams fail instead of waiting for the request bound."""
    sock = transport.get_extra_info("socket")
    if sock is None:
        return
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for option, value in (("TCP_KEEPIDLE", 10), ("TCP_KEEPINTVL", 5), ("TCP_KEEPCNT", 3)):
        if hasattr(socket, option):
            sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, option), value)


class RelayServer:
    """In the model replica: one listening socket; each ingress connects once and claims its streams on it."""

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
            self._server = await loop.create_server(lambda: Peer(self), self.host, 0)
            self._loop = loop
            self.port = self._server.sockets[0].getsockname()[1]
        return self

    def expect(self) -> tuple[Ticket, asyncio.Future]:
        secret = os.urandom(TICKET_BYTES)
        waiter = asyncio.get_running_loop().create_future()
        self._expected[secret] = waiter
        waiter.add_done_callback(lambda _: self._expected.pop(secret, None))
        return Ticket(self.host, self.port, secret), waiter

    def claim(self, secret: bytes) -> asyncio.Future | None:
        waiter = self._expected.get(secret)
        return None if waiter is None or waiter.done() else waiter

    def close(self) -> None:
        if self._server is not None:
            self._server.close()


class Peer(asyncio.Protocol):
    """One ingress's connection, in the replica: its claims and cancels in, every stream's frames out, coalesced."""

    def __init__(self, server: RelayServer):
        self.server = server
        self.sinks: dict[int, Sink] = {}
        self.transport: asyncio.Transport | None = None
        self.lost = False
        self._buffer = b""
        self._pending: list[bytes] = []
        self._paused = False
        self._drained: asyncio.Future | None = None
        self._refusals = 0
        self._claimed = False

    def connection_made(self, transport) -> None:
        self.transport = transport
        # Paused whenever the kernel did not take everything, resumed once it has: `drained` can wait for that.
        transport.set_write_buffer_limits(high=0, low=0)
        keepalive(transport)
        # An ingress claims a stream as soon as it connects; a connection that never does is not one.
        asyncio.get_running_loop().call_later(CONNECT_S, self._unclaimed)

    def _unclaimed(self) -> None:
        if not self._claimed and not self.lost:
            self.transport.abort()

    def data_received(self, data: bytes) -> None:
        buffer = self._buffer + data
        offset, size = 0, len(buffer)
        while size - offset >= CONTROL.size:
            kind, sid = CONTROL.unpack_from(buffer, offset)
            if kind == CLAIM:
                if size - offset < CONTROL.size + TICKET_BYTES:
                    break
                start = offset + CONTROL.size
                self._claim(sid, buffer[start:start + TICKET_BYTES])
                offset = start + TICKET_BYTES
            elif kind == CANCEL:
                offset += CONTROL.size
                if (sink := self.sinks.get(sid)) is not None:
                    sink.release()
            else:  # not the relay's client
                self.transport.abort()
                return
        self._buffer = buffer[offset:]
        if self.backlog() > HIGH_WATER:  # a client that sends and never reads: read no more until it does
            self.transport.pause_reading()

    def _claim(self, sid: int, secret: bytes) -> None:
        waiter = self.server.claim(secret)
        if waiter is None or sid in self.sinks:
            self._refusals += 1
            if self._refusals > MAX_REFUSALS:  # guessing tickets
                self.transport.abort()
                return
            self.queue(HEADER.pack(sid, 0, 0, REFUSED))
            return
        self._claimed = True
        self.sinks[sid] = sink = Sink(self, sid)
        waiter.set_result(sink)

    def queue(self, data: bytes) -> None:
        """Frames written in one loop iteration (one engine step's) leave in one write, at the next."""
        if not self._pending:
            asyncio.get_running_loop().call_soon(self.flush)
        self._pending.append(data)

    def flush(self) -> None:
        if self._pending and not self.lost:
            self.transport.write(b"".join(self._pending))
        self._pending.clear()

    async def drained(self) -> None:
        """Until the kernel has taken everything queued (or the connection is gone)."""
        self.flush()
        while self._paused and not self.lost:
            if self._drained is None or self._drained.done():
                self._drained = asyncio.get_running_loop().create_future()
            await asyncio.shield(self._drained)

    def backlog(self) -> int:
        return 0 if self.lost else self.transport.get_write_buffer_size()

    def pause_writing(self) -> None:
        self._paused = True

    def resume_writing(self) -> None:
        self._paused = False
        if not self.lost:
            self.transport.resume_reading()
        if self._drained is not None and not self._drained.done():
            self._drained.set_result(None)

    def connection_lost(self, exc) -> None:
        """The ingress is gone: every stream on it stops at its next frame."""
        self.lost = True
        for sink in self.sinks.values():
            sink.closed = True
        self.sinks.clear()
        self.resume_writing()


class IngressGone(ConnectionResetError):
    """The ingress cancelled the stream (its client left) or its connection closed: nobody to send to."""


class Sink:
    """One stream's frames, in the replica."""

    __slots__ = ("closed", "peer", "sid")

    def __init__(self, peer: Peer, sid: int):
        self.peer, self.sid, self.closed = peer, sid, False

    async def send(self, payload: bytes, completion_tokens: int) -> None:
        """Raises ConnectionError when the ingress has gone or cancelled the stream: the replica stops generating."""
        if self.closed:
            raise IngressGone("the ingress closed the stream")
        if len(payload) > MAX_MESSAGE:  # the ingress would drop the connection, and every stream on it
            raise ValueError(f"an item of {len(payload)} bytes is beyond the relay's frame limit")
        self.peer.queue(HEADER.pack(self.sid, len(payload), completion_tokens, DATA) + payload)
        if self.peer.backlog() > HIGH_WATER:  # a slow ingress: every stream on its connection waits
            await self.peer.drained()

    async def end(self, completion_tokens: int, kind: int = END, message: str = "") -> None:
        """The end (or error) frame, then until its bytes have left: the request stays in flight for Serve (a
        replica being stopped waits for it) until then."""
        if self.closed:
            return
        body = message.encode()[:4096]
        self.peer.queue(HEADER.pack(self.sid, len(body), completion_tokens, kind) + body)
        self.release()
        try:
            await asyncio.wait_for(self.peer.drained(), END_DRAIN_S)
        except TimeoutError:
            pass

    def release(self) -> None:
        """Closed for good, from either end: the replica's (ended, cut off) or the ingress's (cancelled)."""
        self.closed = True
        if self.peer.sinks.get(self.sid) is self:
            del self.peer.sinks[self.sid]

    def abort(self) -> None:
        """Cut off without an end (the stream's generator cancelled): the ingress sees an error, not an end."""
        if not self.closed:
            self.peer.queue(HEADER.pack(self.sid, 0, 0, ABORTED))
            self.release()


@dataclass(slots=True)
class Progress:
    """How far a stream got, for the replica's count of abandoned work."""

    produced: int = 0
    ended: bool = False
    relayed: bool = False  # the ingress came for the rest on the relay's connection


async def served(items, req: GenerationRequest, relay: RelayServer | None, progress: Progress):
    """The model replica's side of a stream: what crosses the handle (`wire.outgoing` tuples): every item, or for a
    relayed stream the first one with the ticket, then nothing more while the rest goes on the relay. The engine's
    generator is closed however this ends (cancelled, the ingress gone, an error), which aborts its request."""
    sink = waiter = None
    try:
        async for item in items:
            progress.produced = item.usage.completion_tokens
            if sink is not None:
                await sink.send(*outgoing(item, req))
                continue
            if not (req.relay and relay is not None):
                yield outgoing(item, req)
                continue
            ticket, waiter = (await relay.start()).expect()
            yield (*outgoing(item, req), ticket.as_wire())  # the first item and the ticket: one handle message
            sink = await asyncio.wait_for(waiter, CONNECT_S)
            progress.relayed = True
        progress.ended = True
        if sink is not None:
            await sink.end(progress.produced)
    except IngressGone:  # raised by the sink only: the engine's own errors are reported as such below
        pass
    except Exception as exc:
        if sink is None:
            raise
        await sink.end(progress.produced, INVALID if isinstance(exc, InvalidSampling) else FAILED, str(exc))
    finally:
        if waiter is not None and not waiter.done():  # closed before the ingress came: the ticket opens nothing
            waiter.cancel()
        if sink is not None:  # first: synchronous, whatever closing the engine's generator raises
            sink.abort()
        await items.aclose()

