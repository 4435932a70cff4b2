"""The safety stage: Qwen3Guard-Gen prompt and response moderation, and the per-key policy that applies it.

Templates are Qwen3Guard's exact rendered text (`templates/`). User text is tokenized on its own with special
tokens split, then spliced between the template's token ids, so no prompt can close the template or forge a
verdict. A guard answer that does not parse is a guard error, never "safe".
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path

TEMPLATES = Path(__file__).parent / "templates"
PROMPT_TEMPLATE = (TEMPLATES / "qwen3guard_prompt.txt").read_text()
RESPONSE_TEMPLATE = (TEMPLATES / "qwen3guard_response.txt").read_text()
CATEGORIES = ("Violent", "Non-violent Illegal Acts", "Sexual Content or Sexual Acts", "PII",
              "Suicide & Self-Harm", "Unethical Acts", "Politically Sensitive Topics", "Copyright Violation",
              "Jailbreak")
_VERDICT = re.compile(r"\ASafety: (Safe|Unsafe|Controversial)\nCategories: ([^\n]+)(?:\nRefusal: (Yes|No))?\s*\Z")


class GuardMode(str, Enum):
    OFF = "off"
    INPUT = "input"
    OUTPUT = "output"
    BOTH = "both"

    @property
    def checks_input(self) -> bool:
        return self in (GuardMode.INPUT, GuardMode.BOTH)

    @property
    def checks_output(self) -> bool:
        return self in (GuardMode.OUTPUT, GuardMode.BOTH)


@dataclass(frozen=True, slots=True)
class GuardPolicy:
    mode: GuardMode = GuardMode.OFF
    block_controversial: bool = True
    fail_open: bool = False

    @classmethod
    def parse(cls, mode: str | None, default: GuardPolicy) -> GuardPolicy:
        """A key's stored mode (`both`, or `both,loose,open`) over the configured default."""
        if not mode:
            return default
        parts = mode.split(",")
        return cls(GuardMode(parts[0]), block_controversial="loose" not in parts[1:],
                   fail_open="open" in parts[1:])


class GuardError(Exception):
    """The guard could not give a verdict: down, timed out, or answered outside the format."""


@dataclass(frozen=True, slots=True)
class Verdict:
    safety: str
    categories: tuple[str, ...] = ()
    refusal: str | None = None

    def blocks(self, policy: GuardPolicy) -> bool:
        return self.safety == "Unsafe" or (self.safety == "Controversial" and policy.block_controversial)

    def as_dict(self) -> dict:
        out = {"safety": self.safety, "categories": list(self.categories)}
        if self.refusal is not None:
            out["refusal"] = self.refusal
        return out


def parse_verdict(text: str) -> Verdict:
    m = _VERDICT.match(text.strip("\n"))
    if m is None:
        raise GuardError(f"unparseable guard output: {text[:120]!r}")
    safety, cats, refusal = m.groups()
    categories = tuple(c.strip() for c in cats.split(","))
    if categories == ("None",):
        categories = ()
    unknown = [c for c in categories if c not in CATEGORIES]
    if unknown or (safety == "Safe" and categories) or (safety != "Safe" and not categories):
        raise GuardError(f"inconsistent guard output: {text[:120]!r}")
    return Verdict(safety, categories, refusal)


@dataclass(slots=True)
class TemplateTokens:
    """A template cut at its placeholders and tokenized once; `render` splices user text in between."""

    pieces: list[list[int]] = field(default_factory=list)

    @classmethod
    def build(cls, template: str, tokenizer) -> TemplateTokens:
        parts = re.split(r"\{prompt\}|\{response\}", template)
        return cls([tokenizer.encode(p, add_special_tokens=False) for p in parts])

    def render(self, tokenizer, *texts: str) -> list[int]:
        if len(texts) != len(self.pieces) - 1:
            raise ValueError("wrong number of texts for this template")
        ids = list(self.pieces[0])
        for text, piece in zip(texts, self.pieces[1:]):
            ids += user_tokens(tokenizer, text)
            ids += piece
        return ids


def user_tokens(tokenizer, text: str) -> list[int]:
    """User text never yields a special token: `<|im_end|>` typed by a user is plain characters."""
    return tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]


def render_text(template: str, **texts: str) -> str:
    """The template as text (for building the dev guard's training set); serving uses `TemplateTokens`."""
    out = template
    for name, value in texts.items():
        out = out.replace("{" + name + "}", value)
    return out
