"""The stream relay on real sockets in this process: the replica's side (`served`) and the ingress's (`frames`),
batching, the meter's counts, errors, a reader that leaves, and tickets that do not open anything."""

from __future__ import annotations

import asyncio

import pytest

from deployments import relay as relay_module
from deployments.relay import Progress, RelayServer, Ticket, served, ticket_of
from deployments.wire import (
    EngineFailure,
    GenerationRequest,
    InvalidSampling,
    StreamItem,
    Usage,
)
from serve_app.serving.relaying import RelayClosed, frames, links


def request(relay: bool = True) -> GenerationRequest:
    return GenerationRequest("cmpl-1", [[1, 2]], [None], {}, max_tokens=64, render=True, relay=relay)


async def engine(n: int, fail: Exception | None = None, step_s: float = 0.0, closed: list | None = None):
    try:
        for i in range(1, n + 1):
            if fail is not None and i == n:
                raise fail
            await asyncio.sleep(step_s)
            yield StreamItem([{"text": f"t{i}", "index": 0, "logprobs": None, "finish_reason": None}], Usage(2, i))
    finally:
        if closed is not None:
            closed.append(True)


async def run(items, relay, req=None):
    """The replica's generator as the ingress consumes it: the first item, the ticket, then the socket's frames."""
    progress = Progress()
    replica = served(items, req or request(), relay, progress)
    first = await anext(replica)
    ticket = ticket_of(first[2])  # the ticket comes with the first item: no handle message of its own
    assert isinstance(ticket, Ticket)
    batches = []
    rest = asyncio.ensure_future(anext(replica, None))  # the replica waits for the connection, then pumps
    try:
        async for batch in frames(ticket):
            batches.append(batch)
    finally:
        assert await rest is None
    return first, batches, progress


async def opened(relay, items, progress: Progress | None = None):
    """A stream the replica serves and the ingress has started reading: (the replica's pump, the ingress's reader)."""
    replica = served(items, request(), relay, progress or Progress())
    ticket = ticket_of((await anext(replica))[2])
    pump = asyncio.ensure_future(anext(replica, None))  # the replica waits for the connection, then pumps
    return pump, frames(ticket)


async def test_the_rest_of_a_stream_comes_as_frames_with_the_meter():
    relay = await RelayServer("127.0.0.1").start()
    first, batches, progress = await run(engine(50), relay)
    assert first[1] == 1 and b'"t1"' in first[0]
    got = [f for batch in batches for f in batch]
    assert [t for _, t in got] == list(range(2, 51))  # cumulative completion tokens, in order, none lost
    assert all(p.startswith(b"[") and f'"t{t}"'.encode() in p for p, t in got)
    assert progress.ended and progress.produced == 50
    assert len(batches) < 49  # whatever arrived together is read together: fewer writes to the client
    relay.close()


async def test_an_engine_error_after_the_first_item_arrives_as_the_same_exception():
    relay = await RelayServer("127.0.0.1").start()
    with pytest.raises(InvalidSampling, match="bad"):
        await run(engine(5, InvalidSampling("bad sampling")), relay)
    with pytest.raises(EngineFailure, match="boom"):
        await run(engine(5, RuntimeError("boom")), relay)
    relay.close()


async def test_a_reader_that_leaves_stops_the_engine():
    relay = await RelayServer("127.0.0.1").start()
    closed, progress = [], Progress()
    pump, batches = await opened(relay, engine(10_000, step_s=0.001, closed=closed), progress)
    await anext(batches)
    await batches.aclose()  # the client went away: the ingress closes the socket
    assert await asyncio.wait_for(pump, 5) is None
    assert closed == [True] and not progress.ended and progress.produced < 10_000
    relay.close()


async def test_a_replica_that_dies_is_an_error_not_an_end():
    relay = await RelayServer("127.0.0.1").start()
    pump, batches = await opened(relay, engine(10_000, step_s=0.001))
    with pytest.raises(RelayClosed):
        async for _ in batches:
            pump.cancel()  # the replica's generator is cancelled mid-stream: its socket closes without an end
    relay.close()


async def test_unknown_or_reused_tickets_open_nothing():
    relay = await RelayServer("127.0.0.1").start()
    with pytest.raises(RelayClosed):
        async for _ in frames(Ticket("127.0.0.1", relay.port, b"x" * 16)):
            pass
    ticket, waiter = relay.expect()
    waiter.cancel()  # the stream ended before the ingress came
    with pytest.raises(RelayClosed):
        async for _ in frames(ticket):
            pass
    relay.close()


async def test_without_relay_every_item_crosses_the_handle():
    items = [raw async for raw in served(engine(4), request(relay=False), None, Progress())]
    assert items == [(b'[{"text":"t%d","index":0,"logprobs":null,"finish_reason":null}]' % i, i) for i in range(1, 5)]


async def test_a_stream_closed_before_the_ingress_came_leaves_no_open_ticket():
    relay = await RelayServer("127.0.0.1").start()
    replica = served(engine(5), request(), relay, Progress())
    ticket = ticket_of((await anext(replica))[2])
    await replica.aclose()  # cancelled by Serve right after the ticket left
    await asyncio.sleep(0)  # the cancelled waiter's callback forgets its ticket
    assert relay._expected == {}
    with pytest.raises(RelayClosed):
        async for _ in frames(ticket):
            pass
    relay.close()


async def test_many_streams_share_one_connection_and_each_gets_its_own_frames(monkeypatch):
    """64 streams from one replica to one ingress: one connection, each stream's frames complete and in order,
    and the frames queued in one loop iteration leave in one write: far fewer writes than frames."""
    writes, frames_out = [], []
    flush = relay_module.Peer.flush

    def counted(peer):
        if peer._pending:
            writes.append(1)
            frames_out.append(len(peer._pending))
        flush(peer)

    monkeypatch.setattr(relay_module.Peer, "flush", counted)
    relay = await RelayServer("127.0.0.1").start()
    clock = asyncio.Event()

    async def stepped(n):  # one engine: every stream's step n comes in the same loop iteration
        for i in range(1, n + 1):
            await clock.wait()
            yield StreamItem([{"text": f"t{i}", "index": 0, "logprobs": None, "finish_reason": None}], Usage(2, i))

    async def ticks():
        while True:
            clock.set()
            await asyncio.sleep(0)
            clock.clear()
            await asyncio.sleep(0.002)

    ticking = asyncio.ensure_future(ticks())
    results = await asyncio.gather(*(run(stepped(30), relay) for _ in range(64)))
    ticking.cancel()
    assert sum(frames_out) >= 64 * 29 and len(writes) * 8 < sum(frames_out)
    for first, batches, progress in results:
        assert [t for batch in batches for _, t in batch] == list(range(2, 31)) and progress.ended
    assert [key for key in links() if key[1] == relay.port] == [("127.0.0.1", relay.port)]
    relay.close()


async def test_one_stream_leaving_does_not_touch_the_others():
    relay = await RelayServer("127.0.0.1").start()
    closed = []
    pump, batches = await opened(relay, engine(10_000, step_s=0.001, closed=closed))
    stayer = asyncio.ensure_future(run(engine(40, step_s=0.002), relay))
    await anext(batches)
    await batches.aclose()
    assert await asyncio.wait_for(pump, 5) is None and closed == [True]
    _, got, progress = await asyncio.wait_for(stayer, 10)
    assert [t for batch in got for _, t in batch] == list(range(2, 41)) and progress.ended
    relay.close()


async def test_a_lost_connection_ends_every_stream_on_it_both_ways():
    """The replica's process dying closes the connection: every reader gets RelayClosed; the ingress's dying
    closes it the other way: every engine stops at its next frame."""
    relay = await RelayServer("127.0.0.1").start()
    closed, pumps, readers = [], [], []
    for _ in range(3):
        pump, reader = await opened(relay, engine(10_000, step_s=0.001, closed=closed))
        pumps.append(pump)
        readers.append(reader)
    for reader in readers:
        await anext(reader)
    link = links()[("127.0.0.1", relay.port)].result()
    link.transport.abort()  # the ingress side's socket goes: as if its process died
    assert [await asyncio.wait_for(p, 5) for p in pumps] == [None] * 3 and closed == [True] * 3
    for reader in readers:
        with pytest.raises(RelayClosed):
            while True:  # what had arrived, then the error
                await anext(reader)
    relay.close()


async def test_a_replica_connection_that_drops_fails_its_readers():
    relay = await RelayServer("127.0.0.1").start()
    pump, reader = await opened(relay, engine(10_000, step_s=0.001))
    await anext(reader)
    (peer,) = {sink.peer for sink in _sinks(relay)}
    peer.transport.abort()  # the replica's side of the socket goes
    with pytest.raises(RelayClosed):
        while True:
            await anext(reader)
    assert await asyncio.wait_for(pump, 5) is None
    relay.close()


async def test_bytes_that_are_not_the_relay_close_the_connection():
    relay = await RelayServer("127.0.0.1").start()
    reader, writer = await asyncio.open_connection("127.0.0.1", relay.port)
    writer.write(b"GET / HTTP/1.1\r\n\r\n")
    assert await asyncio.wait_for(reader.read(), 5) == b""  # closed, nothing said
    writer.close()
    relay.close()


def _sinks(relay: RelayServer):
    import gc

    return [o for o in gc.get_objects() if isinstance(o, relay_module.Sink) and not o.closed
            and o.peer.server is relay]


async def test_a_stream_leaving_while_the_connection_opens_does_not_fail_the_others():
    relay = await RelayServer("127.0.0.1").start()
    leaver, stayer = relay.expect()[0], relay.expect()
    first = asyncio.ensure_future(anext(frames(leaver)))
    second_reader = frames(stayer[0])
    second = asyncio.ensure_future(anext(second_reader))
    await asyncio.sleep(0)  # both wait on the one connection being opened
    first.cancel()
    sink = await asyncio.wait_for(stayer[1], 5)  # the second stream's claim still arrives
    await sink.send(b"[1]", 2)
    assert await asyncio.wait_for(second, 5) == [(b"[1]", 2)]
    await second_reader.aclose()
    relay.close()


async def test_a_claim_on_a_lost_connection_fails_at_once_and_the_next_stream_reconnects():
    relay = await RelayServer("127.0.0.1").start()
    ticket, waiter = relay.expect()
    reader = frames(ticket)
    pending = asyncio.ensure_future(anext(reader))
    sink = await asyncio.wait_for(waiter, 5)
    link = links()[("127.0.0.1", relay.port)].result()
    link.transport.abort()
    await asyncio.sleep(0.01)
    assert link.lost
    _, inbox = link.claim(b"y" * 16)  # a stream that came for the dead connection: ended, not left waiting
    assert isinstance((await asyncio.wait_for(inbox.take(), 1))[1], RelayClosed)
    with pytest.raises(RelayClosed):
        await pending
    assert sink.closed
    again, waiter = relay.expect()
    fresh = frames(again)
    got = asyncio.ensure_future(anext(fresh))
    await (await asyncio.wait_for(waiter, 5)).send(b"[2]", 3)
    assert await asyncio.wait_for(got, 5) == [(b"[2]", 3)]
    await fresh.aclose()
    relay.close()


async def test_a_frame_beyond_the_limit_fails_every_waiting_stream():
    async def impostor(reader, writer):  # claims pass, then a frame no relay would send
        await reader.readexactly(2 * (5 + 16))
        writer.write(relay_module.HEADER.pack(1, 0, 1, relay_module.END)
                     + relay_module.HEADER.pack(2, relay_module.MAX_MESSAGE + 1, 0, relay_module.DATA))
        await writer.drain()

    server = await asyncio.start_server(impostor, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    ended, failed = frames(Ticket("127.0.0.1", port, b"a" * 16)), frames(Ticket("127.0.0.1", port, b"b" * 16))
    results = await asyncio.wait_for(asyncio.gather(anext(ended, "end"), anext(failed), return_exceptions=True), 5)
    assert results[0] == "end" and isinstance(results[1], RelayClosed)
    server.close()


async def test_an_engine_error_after_the_claim_is_the_engines_not_a_cut_off():
    relay = await RelayServer("127.0.0.1").start()
    with pytest.raises(EngineFailure, match="engine timed out"):
        await run(engine(5, TimeoutError("engine timed out")), relay)
    relay.close()


async def test_guessing_tickets_or_never_claiming_gets_the_connection_dropped(monkeypatch):
    relay = await RelayServer("127.0.0.1").start()
    reader, writer = await asyncio.open_connection("127.0.0.1", relay.port)
    for sid in range(relay_module.MAX_REFUSALS + 5):
        writer.write(relay_module.CONTROL.pack(relay_module.CLAIM, sid) + bytes(16))
    data = await asyncio.wait_for(reader.read(), 5)  # refusals (at most the limit's), then the connection closes
    assert len(data) % relay_module.HEADER.size == 0 and len(data) <= relay_module.MAX_REFUSALS * 13
    writer.close()
    monkeypatch.setattr(relay_module, "CONNECT_S", 0.05)
    reader, writer = await asyncio.open_connection("127.0.0.1", relay.port)
    assert await asyncio.wait_for(reader.read(), 5) == b""  # silent and never claiming: dropped
    writer.close()
    relay.close()


async def test_a_client_that_does_not_read_loses_its_own_stream_only(monkeypatch):
    from serve_app.serving import relaying

    monkeypatch.setattr(relaying, "INBOX_BYTES", 64)
    relay = await RelayServer("127.0.0.1").start()
    (slow, slow_waiter), (fast, fast_waiter) = relay.expect(), relay.expect()
    slow_reader, fast_reader = frames(slow), frames(fast)
    slow_first = asyncio.ensure_future(anext(slow_reader))
    fast_first = asyncio.ensure_future(anext(fast_reader))
    slow_sink, fast_sink = await asyncio.wait_for(slow_waiter, 5), await asyncio.wait_for(fast_waiter, 5)
    await slow_sink.send(b"[0]", 1)
    await fast_sink.send(b"[0]", 1)
    await slow_first, await fast_first
    for i in range(40):  # the slow stream's consumer takes nothing meanwhile
        await slow_sink.send(b"[1]", i + 2)
    await asyncio.sleep(0.05)
    with pytest.raises(RelayClosed, match="too slowly"):
        while True:
            await anext(slow_reader)
    await asyncio.sleep(0.05)
    assert slow_sink.closed and not fast_sink.closed  # cancelled on the replica: its engine stops
    await fast_sink.send(b"[2]", 2)
    assert await asyncio.wait_for(anext(fast_reader), 5) == [(b"[2]", 2)]
    await fast_reader.aclose()
    relay.close()
