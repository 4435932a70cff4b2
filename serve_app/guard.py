"""The safety stage: Qwen3Guard-Gen prompt and response moderation, and the per-key policy that applies it.

Templates are Qwen3Guard's exact rendered text (`templates/`). User text is tokenized on its own with special
tokens split, then spliced between the template's token ids, so no prompt can close the template or forge a
verdict. A guard answer that does not parse is a guard error, never "safe".
"""

from __future__ import annotations

import asyncio
import re
import time
import uuid
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
    return tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]


def render_text(template: str, **texts: str) -> str:
    """The template as text (for building the dev guard's training set); serving uses `TemplateTokens`."""
    out = template
    for name, value in texts.items():
        out = out.replace("{" + name + "}", value)
    return out


class Moderator:
    """Asks the guard deployment for verdicts. Guard tokens are never metered to the customer."""

    VERDICT_TOKENS = 32

    def __init__(self, route, timeout_s: float, metrics=None):
        self.route = route
        self.metrics = metrics
        self.tokenizer = route.tokenizer
        self.timeout_s = timeout_s
        self.prompt_template = TemplateTokens.build(PROMPT_TEMPLATE, self.tokenizer)
        self.response_template = TemplateTokens.build(RESPONSE_TEMPLATE, self.tokenizer)
        self.budget = route.spec.max_model_len - self.response_template.overhead - self.VERDICT_TOKENS

    async def check_prompts(self, texts: list[str]) -> tuple[int, Verdict] | None:
        """The first (prompt index, verdict) that is not Safe, or None; text too long for the guard's context is
        checked in consecutive windows."""
        jobs = [(i, self.prompt_template.splice(w)) for i, text in enumerate(texts)
                for w in self._windows(user_tokens(self.tokenizer, text))]
        verdicts = await asyncio.gather(*(self._ask(ids) for _, ids in jobs))
        return next(((i, v) for (i, _), v in zip(jobs, verdicts) if v.safety != "Safe"), None)

    async def check_response(self, prompt: str, response: str) -> Verdict:
        budget = self.budget // 2
        p = user_tokens(self.tokenizer, prompt)[-budget:]
        r = user_tokens(self.tokenizer, response)
        verdicts = await asyncio.gather(*(self._ask(self.response_template.splice(p, w))
                                          for w in self._windows(r, budget)))
        return next((v for v in verdicts if v.safety != "Safe"), verdicts[0])

    def _windows(self, ids: list[int], budget: int | None = None) -> list[list[int]]:
        size = max(budget or self.budget, 1)
        return [ids[i:i + size] for i in range(0, len(ids), size)] or [[]]

    async def _ask(self, ids: list[int]) -> Verdict:
        from deployments.wire import GenerationRequest

        req = GenerationRequest(request_id="guard-" + uuid.uuid4().hex, prompts=[ids], prompt_texts=[None],
                                sampling={"temperature": 0.0}, max_tokens=self.VERDICT_TOKENS)
        started = time.monotonic()
        try:
            choices, _ = await asyncio.wait_for(self.route.complete.remote(req), self.timeout_s)
        except Exception as exc:
            raise GuardError(f"guard unavailable: {type(exc).__name__}") from exc
        finally:
            if self.metrics is not None:
                self.metrics.guard_latency.observe(time.monotonic() - started)
        return parse_verdict(choices[0]["text"])


CONTENT_FILTER = "content_filter"


def withheld(index: int) -> dict:
    return {"text": "", "index": index, "logprobs": None, "finish_reason": CONTENT_FILTER}


async def moderate_choices(moderator: Moderator, prompts: list[str], n: int, choices: list[dict],
                           policy: GuardPolicy) -> list[dict]:
    """Non-streaming output moderation: every choice is checked; a blocked one is withheld."""
    verdicts = await asyncio.gather(*(moderator.check_response(prompts[c["index"] // n], c["text"])
                                      for c in choices))  # GuardError: the caller applies the failure mode
    return [withheld(c["index"]) if v.blocks(policy) else c for c, v in zip(choices, verdicts)]


class StreamGate:
    """Streaming output moderation: text is held back and released in windows, each after the guard passed the
    cumulative text of its choice; the end of the stream is checked too. Unsafe ends every open choice with
    finish_reason content_filter."""

    def __init__(self, moderator: Moderator, prompts: list[str], n: int, policy: GuardPolicy, window_tokens: int):
        self.moderator = moderator
        self.prompts = prompts
        self.n = n
        self.policy = policy
        self.window = window_tokens
        self.pending: dict[int, dict] = {}
        self.text: dict[int, str] = {}
        self.finished: set[int] = set()
        self.checked_at = 0
        self.blocked: Verdict | None = None

    def add(self, choices: list[dict]) -> None:
        for c in choices:
            i = c["index"]
            self.text[i] = self.text.get(i, "") + c["text"]
            held = self.pending.get(i)
            if held is None:
                self.pending[i] = dict(c)
            else:
                held["text"] += c["text"]
                held["finish_reason"] = c["finish_reason"]
                if c["logprobs"] is not None:
                    held["logprobs"] = {k: held["logprobs"][k] + c["logprobs"][k] for k in c["logprobs"]}
            if c["finish_reason"] is not None:
                self.finished.add(i)

    def due(self, tokens: int) -> bool:
        return tokens - self.checked_at >= self.window

    async def release(self, tokens: int) -> list[dict]:
        """Checks the pending choices; returns what may go to the client (withheld endings when blocked)."""
        self.checked_at = tokens
        indices = sorted(self.pending)
        if not indices:
            return []
        try:
            verdicts = await asyncio.gather(*(self.moderator.check_response(self.prompts[i // self.n], self.text[i])
                                              for i in indices))
        except GuardError:
            if not self.policy.fail_open:
                raise
            verdicts = []
        self.blocked = next((v for v in verdicts if v.blocks(self.policy)), None)
        if self.blocked is not None:
            open_choices = sorted(set(self.text) - self.finished | set(indices))
            self.pending.clear()
            return [withheld(i) for i in open_choices]
        out = [self.pending[i] for i in indices]
        self.pending.clear()
        return out
