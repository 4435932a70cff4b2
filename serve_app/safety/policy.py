"""What the guard may answer and what a key's policy does with it: the modes, the verdict format (parsed strictly:
an answer outside Qwen3Guard's format is a guard error, never "safe"), and the blocking rule."""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import Enum

CATEGORIES = ("Violent", "Non-violent Illegal Acts", "Sexual Content or Sexual Acts", "PII",
              "Suicide & Self-Harm", "Unethical Acts", "Politically Sensitive Topics", "Copyright Violation",
              "Jailbreak")
_VERDICT = re.compile(r"\ASafety: (Safe|Unsafe|Controversial)\nCategories: ([^\n]+)(?:\nRefusal: (Yes|No))?\s*\Z")
MODIFIERS = ("loose", "open")  # `loose`: Controversial passes; `open`: traffic passes while the guard is down


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
        """A key's stored mode (`both`, or `both,loose,open`) over the configured default; anything else is a
        ValueError, so that a typo is refused when the key is created rather than ignored."""
        if not mode:
            return default
        first, *modifiers = mode.split(",")
        unknown = [m for m in modifiers if m not in MODIFIERS]
        if unknown:
            raise ValueError(f"unknown guard modifier(s) {unknown}: use {', '.join(MODIFIERS)}")
        return cls(GuardMode(first), block_controversial="loose" not in modifiers, fail_open="open" in modifiers)


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
    # An unsafe verdict without a category is still that verdict (the safety line decides; refusing it as an error
    # would let it through under a fail-open policy); a Safe one with categories is ambiguous, an error.
    if unknown or (safety == "Safe" and categories):
        raise GuardError(f"inconsistent guard output: {text[:120]!r}")
    return Verdict(safety, categories, refusal)
