"""The stream relay on real sockets in this process: the replica's side (`served`) and the ingress's (`frames`),
batching, the meter's counts, errors, a reader that leaves, and tickets that do not open anything."""

from __future__ import annotations

import asyncio

import pytest

from deployments.relay import Progress, RelayClosed, RelayServer, Ticket, frames, served, ticket_of
from deployments.wire import EngineFailure, GenerationRequest, InvalidSampling, StreamItem, Usage


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
    ticket = ticket_of(await anext(replica))
    assert isinstance(ticket, Ticket)
    batches = []
    rest = asyncio.ensure_future(anext(replica, None))  # the replica waits for the connection, then pumps
    try:
        async for batch in frames(ticket):
            batches.append(batch)
    finally:
        assert await rest is None
    return first, batches, progress


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
    replica = served(engine(10_000, step_s=0.001, closed=closed), request(), relay, progress)
    await anext(replica)
    ticket = ticket_of(await anext(replica))
    pump = asyncio.ensure_future(anext(replica, None))
    batches = frames(ticket)
    await anext(batches)
    await batches.aclose()  # the client went away: the ingress closes the socket
    assert await asyncio.wait_for(pump, 5) is None
    assert closed == [True] and not progress.ended and progress.produced < 10_000
    relay.close()


async def test_a_replica_that_dies_is_an_error_not_an_end():
    relay = await RelayServer("127.0.0.1").start()
    replica = served(engine(10_000, step_s=0.001), request(), relay, Progress())
    await anext(replica)
    ticket = ticket_of(await anext(replica))
    pump = asyncio.ensure_future(anext(replica, None))
    with pytest.raises(RelayClosed):
        async for _ in frames(ticket):
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
    assert [t for _, t in items] == [1, 2, 3, 4] and ticket_of(items[-1]) is None


async def test_a_stream_closed_before_the_ingress_came_leaves_no_open_ticket():
    relay = await RelayServer("127.0.0.1").start()
    replica = served(engine(5), request(), relay, Progress())
    await anext(replica)
    ticket = ticket_of(await anext(replica))
    await replica.aclose()  # cancelled by Serve right after the ticket left
    await asyncio.sleep(0)  # the cancelled waiter's callback forgets its ticket
    assert relay._expected == {}
    with pytest.raises(RelayClosed):
        async for _ in frames(ticket):
            pass
    relay.close()
