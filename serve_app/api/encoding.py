"""Server-sent events framing and the response objects, streamed and whole: `text_completion` for completions,
`chat.completion` and its chunks for chat."""

from __future__ import annotations

from deployments.choices import chat_deltas, chat_messages
from deployments.wire import dumps

DONE = b"data: [DONE]\n\n"


class CompletionFrame:
    """The parts every chunk of one response shares; `chunk` only adds the choices."""

    OBJECT = CHUNK = "text_completion"

    def __init__(self, completion_id: str, created: int, model: str, include_usage: bool,
                 continuous_usage: bool = False):
        self.completion_id = completion_id
        self.continuous_usage = continuous_usage  # vLLM's continuous_usage_stats: every chunk has the usage so far
        self.created = created
        self.model = model
        self.include_usage = include_usage
        # Every chunk is this head, its choices and this tail: built once per response, not per chunk.
        head = dumps({"id": completion_id, "object": self.CHUNK, "created": created, "model": model})
        self._head = b"data: " + head[:-1] + b',"choices":'
        self._tail = b',"usage":null}\n\n' if include_usage else b"}\n\n"

    def obj(self, choices: list[dict], usage: dict | None) -> dict:
        return self._obj(self.OBJECT, choices, usage)

    def _obj(self, kind: str, choices: list[dict], usage: dict | None) -> dict:
        out = {"id": self.completion_id, "object": kind, "created": self.created, "model": self.model,
               "choices": choices}
        if usage is not None or self.include_usage:
            out["usage"] = usage
        return out

    def opening(self, usage: dict | None = None) -> bytes | None:
        return None

    def chunk(self, choices: list[dict], usage: dict | None = None) -> bytes:
        return self.rendered_chunk(dumps(choices), usage)

    def rendered_chunk(self, choices_json: bytes, usage: dict | None = None) -> bytes:
        """A chunk from choices the model replica already rendered (`wire.outgoing`)."""
        if usage is not None:
            return self._head + choices_json + b',"usage":' + dumps(usage) + b"}\n\n"
        return self._head + choices_json + self._tail

    def usage_chunk(self, usage: dict) -> bytes:
        return event(self.obj([], usage))


class ChatFrame(CompletionFrame):
    """`chat.completion` objects and `chat.completion.chunk` events: the same framing, chat's shapes. The engine's
    choices are completion-shaped; they become chat's here, or in the model replica when it renders them."""

    OBJECT, CHUNK = "chat.completion", "chat.completion.chunk"

    def __init__(self, completion_id: str, created: int, model: str, include_usage: bool, top_logprobs: int | None,
                 choices: int, continuous_usage: bool = False):
        super().__init__(completion_id, created, model, include_usage, continuous_usage)
        self.top_logprobs = top_logprobs
        self.choices = choices

    def obj(self, choices: list[dict], usage: dict | None) -> dict:
        return self._obj(self.OBJECT, chat_messages(choices, self.top_logprobs), usage)

    def chunk(self, choices: list[dict], usage: dict | None = None) -> bytes:
        return self.rendered_chunk(dumps(chat_deltas(choices, self.top_logprobs)), usage)

    def usage_chunk(self, usage: dict) -> bytes:
        return event(self._obj(self.CHUNK, [], usage))

    def opening(self, usage: dict | None = None) -> bytes | None:
        """The stream's first event: each choice's role, before any content (as OpenAI and vLLM send it)."""
        return self.rendered_chunk(dumps([{"index": i, "delta": {"role": "assistant", "content": ""},
                                           "logprobs": None, "finish_reason": None} for i in range(self.choices)]),
                                   usage if self.continuous_usage else None)


def event(payload: dict) -> bytes:
    return b"data: " + dumps(payload) + b"\n\n"
