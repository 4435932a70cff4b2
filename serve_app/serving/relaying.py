"""The ingress's side of the stream relay (`deployments/relay.py` has the replica's side and the wire format): one
connection per model replica (`Link`) shared by the streams between them, and where a relayed stream's tokens leave
for the client: whatever one read brought for a stream becomes one write to its client, however many engine steps
it held, and the meter follows the frames' token counts."""

from __future__ import annotations

import asyncio
import weakref
from contextlib import aclosing

from deployments.relay import (
    CANCEL,
    CLAIM,
    CONNECT_S,
    CONTROL,
    DATA,
    END,
    FAILED,
    HEADER,
    INVALID,
    MAX_MESSAGE,
    REFUSED,
    Ticket,
    keepalive,
)
from deployments.wire import EngineFailure, InvalidSampling, StreamItem, Usage

INBOX_BYTES = 32 << 20  # what one stream may hold in the ingress for a client that does not read: then it is cut


async def relayed(ticket: Ticket, frame, outcome, received, prompt_tokens: int):
    """Yields ready bytes. `outcome.usage` is what was produced, `received.delivered` what the client was given (the
    lease checkpoints it); both are updated once per batch, never per token."""
    continuous = frame.continuous_usage
    async with aclosing(frames(ticket)) as batches:  # closing it cancels the stream: the replica stops generating
        async for batch in batches:
            if continuous:
                chunks = [frame.rendered_chunk(p, Usage(prompt_tokens, t).as_dict()) for p, t in batch]
            else:
                chunks = [frame.rendered_chunk(p, None) for p, _ in batch]
            payload, tokens = batch[-1]
            usage = Usage(prompt_tokens, tokens)
            outcome.usage, outcome.ending = usage, StreamItem([], usage, payload)
            yield b"".join(chunks)
            received.delivered = usage


class RelayClosed(ConnectionError):
    """The replica's side ended without an end frame (the replica died, or refused the ticket)."""


class Inbox:
    """One stream's frames as they arrive, in the ingress, until its consumer takes them."""

    __slots__ = ("ending", "items", "size", "waiter")

    def __init__(self):
        self.items: list[tuple[bytes, int]] = []
        self.size = 0  # bytes received since its consumer last took them
        self.ending: bool | BaseException | None = None  # True at the end frame, or the error to raise
        self.waiter: asyncio.Future | None = None

    def wake(self) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    async def take(self) -> tuple[list[tuple[bytes, int]], bool | BaseException | None]:
        """Whatever has arrived (waiting for something if nothing has), and the ending if it came."""
        if not self.items and self.ending is None:
            self.waiter = asyncio.get_running_loop().create_future()
            await self.waiter
        items, self.items, self.size = self.items, [], 0
        return items, self.ending


class Link(asyncio.Protocol):
    """The ingress's one connection to one replica's relay, shared by every stream between them."""

    def __init__(self, table: dict, key: tuple[str, int]):
        self.table, self.key = table, key
        self.inboxes: dict[int, Inbox] = {}
        self.transport: asyncio.Transport | None = None
        self.lost = False
        self._next = 0
        self._buffer = b""

    def connection_made(self, transport) -> None:
        self.transport = transport
        keepalive(transport)

    def claim(self, secret: bytes) -> tuple[int, Inbox]:
        self._next = sid = (self._next + 1) & 0xFFFFFFFF
        inbox = Inbox()
        if self.lost:  # gone between the connection's setup and this claim
            inbox.ending = RelayClosed("the model replica closed the connection")
            return sid, inbox
        self.inboxes[sid] = inbox
        self.transport.write(CONTROL.pack(CLAIM, sid) + secret)
        return sid, inbox

    def release(self, sid: int) -> None:
        """The stream's reader is done; if the replica has not ended it, it stops at its next frame."""
        inbox = self.inboxes.pop(sid, None)
        if inbox is not None and inbox.ending is None and not self.lost:
            self.transport.write(CONTROL.pack(CANCEL, sid))

    def data_received(self, data: bytes) -> None:
        woken: list[Inbox] = []
        try:
            self._parse(self._buffer + data, woken)
        finally:
            for inbox in woken:  # once each, after the whole read: a stream's frames of this read are one batch
                inbox.wake()

    def _parse(self, buffer: bytes, woken: list[Inbox]) -> None:
        offset, size = 0, len(buffer)
        while size - offset >= HEADER.size:
            sid, length, tokens, kind = HEADER.unpack_from(buffer, offset)
            if length > MAX_MESSAGE:  # not the relay speaking: every stream on it fails (connection_lost)
                self.transport.abort()
                return
            start = offset + HEADER.size
            if size - start < length:
                break
            offset = start + length
            inbox = self.inboxes.get(sid)
            if inbox is None:  # a stream its reader already left
                continue
            if kind == DATA:
                inbox.items.append((buffer[start:offset], tokens))
                inbox.size += length
                if inbox.size > INBOX_BYTES:  # its client reads far slower than the engine writes
                    del self.inboxes[sid]
                    self.transport.write(CONTROL.pack(CANCEL, sid))
                    inbox.ending = RelayClosed("the client read the stream too slowly")
            else:
                del self.inboxes[sid]
                message = buffer[start:offset].decode(errors="replace")
                inbox.ending = True if kind == END else InvalidSampling(message) if kind == INVALID else \
                    EngineFailure(message) if kind == FAILED else \
                    RelayClosed("the model replica refused the stream's ticket" if kind == REFUSED else
                                "the model replica cut the stream off")
            woken.append(inbox)
        self._buffer = buffer[offset:]

    def connection_lost(self, exc) -> None:
        self.lost = True
        pending = self.table.get(self.key)
        if pending is not None and pending.done() and not pending.cancelled() and pending.exception() is None \
                and pending.result() is self:
            del self.table[self.key]
        for inbox in self.inboxes.values():
            inbox.ending = RelayClosed("the model replica closed the stream")
            inbox.wake()
        self.inboxes.clear()


# loop -> (host, port) -> the Link, shared by the ingress's streams (a loop per test in the tests)
_links: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[tuple[str, int], asyncio.Future]] = \
    weakref.WeakKeyDictionary()


def links() -> dict[tuple[str, int], asyncio.Future]:
    """This loop's connections to replicas, by their relay's address."""
    loop = asyncio.get_running_loop()
    table = _links.get(loop)
    if table is None:
        table = _links[loop] = {}
    return table


async def _link(host: str, port: int) -> Link:
    loop, table, key = asyncio.get_running_loop(), links(), (host, port)
    pending = table.get(key)
    if pending is None or (pending.done() and not pending.cancelled() and pending.exception() is None
                           and pending.result().lost):  # failed or lost: the next stream connects anew
        # A task of its own: the stream that started it leaving (its client gone) does not fail the others waiting.
        pending = table[key] = loop.create_task(_connect(table, key))
        pending.add_done_callback(lambda task: task.cancelled() or task.exception())  # retrieved, if nobody waits
    return await asyncio.shield(pending)


async def _connect(table: dict, key: tuple[str, int]) -> Link:
    loop = asyncio.get_running_loop()
    try:
        _, link = await asyncio.wait_for(loop.create_connection(lambda: Link(table, key), *key), CONNECT_S)
    except BaseException:
        if table.get(key) is asyncio.current_task():
            del table[key]
        raise
    return link


async def frames(ticket: Ticket):
    """In the ingress: the stream's frames as they arrive, in batches (what one read brought for it): lists of
    (payload, cumulative completion tokens). Ends at the end frame; an error frame raises the engine's error
    (InvalidSampling or EngineFailure); a replica that died or refused the ticket raises RelayClosed. Closing this
    generator cancels the stream, which the replica sees at its next frame."""
    link = await _link(ticket.host, ticket.port)
    sid, inbox = link.claim(ticket.secret)
    try:
        while True:
            batch, ending = await inbox.take()
            if batch:
                yield batch
            if ending is True:
                return
            if ending is not None:
                raise ending
    finally:
        link.release(sid)
