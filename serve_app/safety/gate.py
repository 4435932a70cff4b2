"""Streaming output moderation: text is held back and released in windows, each after the guard passed its choice's
text so far; the end of the stream is checked too. Unsafe ends every open choice with finish_reason content_filter.

The guard's work grows linearly with the output: each choice's new text is tokenized once (never the whole text
again), and each check judges the current segment of the response (at most a guard window, overlapping the one
before), not every window from the start."""

from __future__ import annotations

import asyncio

from deployments.choices import merge_fragments
from serve_app.safety.moderator import Moderator, windows_from, withheld
from serve_app.safety.policy import GuardError, GuardPolicy, Verdict
from serve_app.safety.templates import user_tokens


TAIL_CHARS = 64


class StreamGate:
    def __init__(self, moderator: Moderator, prompts: list[str], n: int, policy: GuardPolicy, window_tokens: int):
        self.moderator = moderator
        self.prompts = prompts
        self.n = n
        self.policy = policy
        self.window = window_tokens
        self.pending: list[dict] = []
        self.fresh: dict[int, list[str]] = {}  # choice -> text not yet tokenized
        self.ids: dict[int, list[int]] = {}  # choice -> its response's guard tokens so far
        self.anchor: dict[int, int] = {}  # choice -> where its current segment starts
        self.contexts: dict[int, list[int]] = {}  # prompt -> the end of it, as the guard's context
        self.finished: set[int] = set()
        self.checked_at = 0
        self.blocked: Verdict | None = None

    def add(self, choices: list[dict]) -> None:
        for c in choices:
            i = c["index"]
            self.fresh.setdefault(i, []).append(c["text"])
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
            verdicts = await asyncio.gather(*(self.moderator.judge_response(self._context(i // self.n),
                                                                            self._segment(i)) for i in indices))
        except GuardError:
            if not self.policy.fail_open:
                raise
            verdicts = []
        self.blocked = next((v for v in verdicts if v.blocks(self.policy)), None)
        out, self.pending = self.pending, []
        if self.blocked is not None:
            # Every choice ends that has not (its ending may be in what is withheld now), not begun ones included.
            unended = set(range(len(self.prompts) * self.n)) - self.finished | set(indices)
            return [withheld(i) for i in sorted(unended)]
        return out

    def _segment(self, i: int) -> list[list[int]]:
        """This release's windows of choice i. New text is tokenized once, up to its last space: the word it ends
        in is judged now but tokenized again with what follows (so a word cut by a release reaches the guard as it
        would whole); a run of more than TAIL_CHARS without a space is taken as it is."""
        ids = self.ids.setdefault(i, [])
        fresh = "".join(self.fresh[i])
        cut = len(fresh) if i in self.finished else fresh.rfind(" ") + 1
        if len(fresh) - cut > TAIL_CHARS:
            cut = len(fresh)
        tokenizer = self.moderator.tokenizer
        if cut:
            ids += user_tokens(tokenizer, fresh[:cut])
        tail = fresh[cut:]
        self.fresh[i] = [tail] if tail else []
        judged = ids + user_tokens(tokenizer, tail) if tail else ids
        parts, self.anchor[i] = windows_from(judged, self.anchor.get(i, 0), self.moderator.response_budget)
        return parts

    def _context(self, p: int) -> list[int]:
        if p not in self.contexts:
            self.contexts[p] = self.moderator.context(self.prompts[p])
        return self.contexts[p]
