"""Where a relayed stream's tokens leave for the client (`deployments/relay.py`): each socket read becomes one
write to the client, however many engine steps it brought, and the meter follows the frames' token counts."""

from __future__ import annotations

from contextlib import aclosing

from deployments.relay import Ticket, frames
from deployments.wire import StreamItem, Usage


async def relayed(ticket: Ticket, frame, outcome, received, prompt_tokens: int):
    """Yields ready bytes. `outcome.usage` is what was produced, `received.delivered` what the client was given (the
    lease checkpoints it); both are updated once per batch, never per token."""
    continuous = frame.continuous_usage
    async with aclosing(frames(ticket)) as batches:  # closing it closes the socket: the replica stops generating
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
