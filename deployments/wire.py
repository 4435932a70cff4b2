"""What crosses the Serve handle between the ingress and a model deployment.

Kept free of vLLM imports so that the ingress, which holds no engine, can build these.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


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


class EngineFailure(Exception):
    """The engine failed a request; the ingress answers 502 `upstream_error`."""


class InvalidSampling(ValueError):
    """vLLM refused the sampling parameters; the ingress answers 400 `invalid_request`."""
