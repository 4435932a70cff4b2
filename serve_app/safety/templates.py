"""Qwen3Guard-Gen's exact templates (`templates/`), tokenized once and spliced with user text. User text is
tokenized on its own with special tokens split, so no prompt can close the template or forge a verdict."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from deployments.tokenizers import plain_tokens

TEMPLATES = Path(__file__).parent / "templates"
PROMPT_TEMPLATE = (TEMPLATES / "qwen3guard_prompt.txt").read_text()
RESPONSE_TEMPLATE = (TEMPLATES / "qwen3guard_response.txt").read_text()


@dataclass(slots=True)
class TemplateTokens:
    """A template cut at its placeholders and tokenized once; `render` splices user text in between."""

    pieces: list[list[int]] = field(default_factory=list)

    @classmethod
    def build(cls, template: str, tokenizer) -> TemplateTokens:
        parts = re.split(r"\{prompt\}|\{response\}", template)
        return cls([tokenizer.encode(p, add_special_tokens=False) for p in parts])

    def render(self, tokenizer, *texts: str) -> list[int]:
        return self.splice(*(user_tokens(tokenizer, t) for t in texts))

    def splice(self, *segments: list[int]) -> list[int]:
        if len(segments) != len(self.pieces) - 1:
            raise ValueError("wrong number of texts for this template")
        ids = list(self.pieces[0])
        for segment, piece in zip(segments, self.pieces[1:]):
            ids += segment
            ids += piece
        return ids

    @property
    def overhead(self) -> int:
        return sum(len(p) for p in self.pieces)


def user_tokens(tokenizer, text: str) -> list[int]:
    """User text never yields a special token: `<|im_end|>` typed by a user is plain characters."""
    return plain_tokens(tokenizer, text)
