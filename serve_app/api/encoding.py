"""Server-sent events framing and the `text_completion` objects, streamed and whole."""

from __future__ import annotations

from deployments.wire import dumps

DONE = b"data: [DONE]\n\n"


class CompletionFrame:
    """The parts every chunk of one response shares; `chunk` only adds the choices."""

    def __init__(self, completion_id: str, created: int, model: str, include_usage: bool):
        self.completion_id = completion_id
        self.created = created
        self.model = model
        self.include_usage = include_usage
        # Every chunk is this head, its choices and this tail: built once per response, not per chunk.
        head = dumps({"id": completion_id, "object": "text_completion", "created": created, "model": model})
        self._head = b"data: " + head[:-1] + b',"choices":'
        self._tail = b',"usage":null}\n\n' if include_usage else b"}\n\n"

    def obj(self, choices: list[dict], usage: dict | None) -> dict:
        out = {"id": self.completion_id, "object": "text_completion", "created": self.created, "model": self.model,
               "choices": choices}
        if usage is not None or self.include_usage:
            out["usage"] = usage
        return out

    def chunk(self, choices: list[dict]) -> bytes:
        return self._head + dumps(choices) + self._tail

    def rendered_chunk(self, choices_json: bytes) -> bytes:
        """A chunk from choices the model replica already rendered (`wire.outgoing`)."""
        return self._head + choices_json + self._tail

    def usage_chunk(self, usage: dict) -> bytes:
        return event(self.obj([], usage))


def event(payload: dict) -> bytes:
    return b"data: " + dumps(payload) + b"\n\n"
