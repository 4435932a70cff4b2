"""Reading a model's stream through its Serve handle: the next item (a relayed stream's first one carries the relay's
ticket), the first one within a bound, and the tasks given up on. Serve's handle turns a task's cancellation into RequestCancelledError; a task
nobody awaits any more has whatever it ended with retrieved here, so that it is never logged as a traceback."""

from __future__ import annotations

import asyncio

from deployments.wire import StreamItem, incoming

_END = object()


async def next_item(stream, prompt_tokens: int, default=_END) -> StreamItem | None:
    """The next item from the model's stream (`wire.incoming`; a relayed stream's first one carries the relay's
    ticket); `default` at its end."""
    raw = await anext(stream) if default is _END else await anext(stream, _END)
    return default if raw is _END else incoming(raw, prompt_tokens)


async def first_item(stream, prompt_tokens: int, timeout_s: float) -> StreamItem | None:
    """The first item within `timeout_s`, read in a task of its own (as `wait_for` would), retrieved however it
    ends: `wait_for`, cancelled itself, leaves that task's RequestCancelledError unretrieved."""
    item = asyncio.ensure_future(next_item(stream, prompt_tokens))
    item.add_done_callback(retrieved)
    return await asyncio.wait_for(item, timeout_s)


def abandon(task: asyncio.Future) -> None:
    task.cancel()
    task.add_done_callback(retrieved)


def retrieved(task: asyncio.Future) -> None:
    task.cancelled() or task.exception()
