"""What crosses the Serve handle between the ingress and a model deployment.

Kept free of vLLM imports so that the ingress, which holds no engine, can build these.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from deployments.choices import chat_deltas

_dumps = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode


def dumps(payload: dict | list) -> bytes:
    """The one JSON encoding of what reaches clients (compact, UTF-8), whichever side renders it: the model replica
    (`outgoing`) or the ingress (`serve_app/api/encoding.py`), so a chunk is the same bytes either way."""
    return _dumps(payload).encode()


@dataclass(slots=True)
class GenerationRequest:
    """One completions request, already validated and tokenized by the ingress."""

    request_id: str
    prompts: list[list[int]]
    prompt_texts: list[str | None]
    sampling: dict[str, Any]
    n: int = 1
    best_of: int | None = None
    logprobs: int | None = None
    echo: bool = False
    max_tokens: int = field(kw_only=True)  # no default here: the ingress's is CompletionRequest.max_tokens_or_default
    trace_context: dict[str, str] = field(default_factory=dict)
    render: bool = False  # stream items carry their choices as JSON, ready to send (no output gate reads them)
    chat: bool = False  # rendered choices take chat.completion.chunk's shape
    return_token_ids: bool = False  # choices carry `token_ids` (the first fragment also `prompt_token_ids`)
    priority: int = 0  # for engines that schedule by priority (lower runs first)
    prompt_logprobs: int | None = None  # alternatives per prompt token, on each choice's first fragment
    relay: bool = False  # a rendered stream's items after the first go on the relay's socket (deployments/relay.py)

    @property
    def prompt_tokens(self) -> int:
        """Counted once per prompt, whatever `n`: what the usage reports and the ledger charges."""
        return sum(len(p) for p in self.prompts)


@dataclass(slots=True)
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0

    def as_dict(self) -> dict[str, int]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
        }


@dataclass(slots=True)
class StreamItem:
    """A batch of choice fragments (OpenAI `choices[]` entries) the engine produced since the last item.

    `usage` is cumulative so that the ingress can bill a disconnected stream for what was produced.
    """

    choices: list[dict[str, Any]]
    usage: Usage
    rendered: bytes | None = None  # the choices as JSON, when the request asked for `render` (choices then empty)
    relay: tuple | None = None  # on a relayed stream's first item: the ticket (wire form) for the rest, on the relay


def outgoing(item: StreamItem, req: GenerationRequest) -> tuple[list | bytes, int]:
    """A stream item as it crosses the handle, once per engine step per stream: a plain tuple (pickled in about a
    microsecond, where the dataclass takes ten), with the choices already JSON when nothing on the ingress reads
    them, so the ingress only frames bytes. The prompt's tokens are not sent: the ingress counted them."""
    if not req.render:
        return item.choices, item.usage.completion_tokens
    choices = chat_deltas(item.choices, req.logprobs) if req.chat else item.choices
    return dumps(choices), item.usage.completion_tokens


def incoming(raw: tuple, prompt_tokens: int) -> StreamItem:
    """An item from the handle: `outgoing`'s tuple, with the relay's ticket as a third element on a relayed
    stream's first item (so that the ticket costs no handle message of its own)."""
    payload, completion_tokens, *ticket = raw
    usage, relay = Usage(prompt_tokens, completion_tokens), ticket[0] if ticket else None
    if isinstance(payload, bytes):
        return StreamItem([], usage, payload, relay)
    return StreamItem(payload, usage, None, relay)


class EngineFailure(Exception):
    """The engine failed a request; the ingress answers 502 `upstream_error`."""


class InvalidSampling(ValueError):
    """vLLM refused the sampling parameters; the ingress answers 400 `invalid_request`."""
