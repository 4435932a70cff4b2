"""Streaming output moderation: text is held back and released in windows, each after the guard passed the
cumulative text of its choice; the end of the stream is checked too. Unsafe ends every open choice with
finish_reason content_filter."""

from __future__ import annotations

import asyncio

from deployments.choices import merge_fragments
from serve_app.safety.moderator import Moderator, withheld
from serve_app.safety.policy import GuardError, GuardPolicy, Verdict


class StreamGate:
    def __init__(self, moderator: Moderator, prompts: list[str], n: int, policy: GuardPolicy, window_tokens: int):
        self.moderator = moderator
        self.prompts = prompts
        self.n = n
        self.policy = policy
        self.window = window_tokens
        self.pending: list[dict] = []
        self.text: dict[int, str] = {}
        self.finished: set[int] = set()
        self.checked_at = 0
        self.blocked: Verdict | None = None

    def add(self, choices: list[dict]) -> None:
        for c in choices:
            i = c["index"]
            self.text[i] = self.text.get(i, "") + c["text"]
            if c["finish_reason"] is not None:
                self.finished.add(i)
        self.pending = merge_fragments([*self.pending, *(dict(c) for c in choices)])

    def due(self, tokens: int) -> bool:
        return tokens - self.checked_at >= self.window

    async def release(self, tokens: int) -> list[dict]:
        """Checks the pending choices; returns what may go to the client (withheld endings when blocked)."""
        self.checked_at = tokens
        if not self.pending:
            return []
        indices = [c["index"] for c in self.pending]
        try:
            verdicts = await asyncio.gather(*(self.moderator.check_response(self.prompts[i // self.n], self.text[i])
                                              for i in indices))
        except GuardError:
            if not self.policy.fail_open:
                raise
            verdicts = []
        self.blocked = next((v for v in verdicts if v.blocks(self.policy)), None)
        out, self.pending = self.pending, []
        if self.blocked is not None:
            return [withheld(i) for i in sorted(set(self.text) - self.finished | set(indices))]
        return out
