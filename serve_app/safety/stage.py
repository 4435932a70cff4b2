"""The safety stage as the request path sees it: one `Screening` per request, which runs the input check beside
generation, moderates whole outputs, and gates streams, applying the key's policy and its failure mode."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import Any

from serve_app.api.errors import ApiError, Code, upstream
from serve_app.safety.gate import StreamGate
from serve_app.safety.moderator import CONTENT_FILTER, Moderator, moderate_choices
from serve_app.safety.policy import GuardError, GuardPolicy
from serve_app.telemetry.tracing import guardrail, judged

log = logging.getLogger("qbt.safety")
OFF = GuardPolicy()
UNAVAILABLE_HEADER = ("x-qbt-guard", "unavailable")


class SafetyStage:
    """The configured guard and default policy; `screen` applies them to one request."""

    def __init__(self, moderator: Moderator | None, default: GuardPolicy = OFF, window_tokens: int = 16,
                 metrics=None):
        self.moderator = moderator
        self.default = default
        self.window_tokens = window_tokens
        self.metrics = metrics

    def policy(self, key_mode: str | None, moderated: bool) -> GuardPolicy:
        """The key's policy over the config's; models that are not moderated (the safety models) get none."""
        if self.moderator is None or not moderated:
            return OFF
        try:
            return GuardPolicy.parse(key_mode, self.default)
        except ValueError as exc:  # a key stored before modifiers were checked: the configured policy applies
            log.warning("key guard mode %r not understood (%s); applying the default policy", key_mode, exc)
            return self.default

    @staticmethod
    def unjudged(policy: GuardPolicy, logprobs: int | None, prompt_logprobs: int | None = None) -> ApiError | None:
        """Under output moderation, the guard judges the text returned, not the alternatives: `logprobs` (and with
        `echo`, the prompt's) and `prompt_logprobs` would show tokens it never judged, so they are refused, never
        silently dropped."""
        if not policy.mode.checks_output:
            return None
        for name, value in (("logprobs", logprobs), ("prompt_logprobs", prompt_logprobs)):
            if value is not None:
                return ApiError(Code.INVALID_REQUEST, f"{name} are not available to keys whose output is "
                                "moderated: the alternative tokens would not be judged by the safety guard.", name)
        return None

    def screen(self, policy: GuardPolicy, texts: list[str], n: int, span, request_id: str) -> Screening:
        screening = Screening(self, policy, texts, n, span, request_id)
        if policy.mode.checks_input:
            screening.input_check = asyncio.create_task(judged(
                guardrail(span, "input", self.moderator.route.spec.id), self.moderator.check_prompts(texts),
                lambda found: (found is not None and found[1].blocks(policy), found and found[1])))
        return screening


@dataclass(slots=True)
class Screening:
    stage: SafetyStage
    policy: GuardPolicy
    texts: list[str]
    n: int
    span: Any
    request_id: str
    input_check: asyncio.Task | None = None
    headers: dict[str, str] = field(default_factory=dict)
    verdict: Any = field(default=None)  # the input verdict once known: (ApiError | None,)

    async def input_verdict(self) -> ApiError | None:
        """The input guard's answer (judged once), awaited only once generation has been started beside it."""
        if self.verdict is None:
            self.verdict = (await self._judge_input(),)
        return self.verdict[0]

    async def _judge_input(self) -> ApiError | None:
        if self.input_check is None:
            return None
        try:
            found = await self.input_check
        except GuardError as exc:
            return self.failed(exc)
        if self.stage.metrics is not None:
            self.stage.metrics.guard_verdicts.inc(tags={"direction": "input",
                                                        "verdict": "Safe" if found is None else found[1].safety})
        if found is None or not found[1].blocks(self.policy):
            return None
        index, verdict = found
        return ApiError(Code.CONTENT_FILTER, f"The prompt was refused by the safety guard ({verdict.safety}: "
                        f"{', '.join(verdict.categories)}).", "prompt",
                        detail={"guard": {**verdict.as_dict(), "prompt_index": index}})

    async def moderate(self, choices: list[dict]) -> list[dict]:
        """Whole outputs: blocked choices are withheld; a guard failure is an ApiError unless the policy is open."""
        if not self.policy.mode.checks_output:
            return choices
        try:
            return await judged(guardrail(self.span, "output", self.stage.moderator.route.spec.id), moderate_choices(
                self.stage.moderator, self.texts, self.n, choices, self.policy),
                lambda out: (any(c["finish_reason"] == CONTENT_FILTER for c in out), None))
        except GuardError as exc:
            if (refused := self.failed(exc)) is not None:
                raise refused from None
            return choices

    def gate(self) -> Gate | None:
        """Streams: None when outputs are not moderated, so the stream path does no per-item work for them."""
        if not self.policy.mode.checks_output:
            return None
        return Gate(StreamGate(self.stage.moderator, self.texts, self.n, self.policy, self.stage.window_tokens),
                    self.span)

    def failed(self, exc: GuardError) -> ApiError | None:
        log.warning("guard failed for %s: %s", self.request_id, exc)
        if self.policy.fail_open:
            self.headers[UNAVAILABLE_HEADER[0]] = UNAVAILABLE_HEADER[1]
            return None
        return upstream("The safety guard is unavailable; the request was not served. Retry shortly.")

    def cancel(self) -> None:
        if self.input_check is not None:
            self.input_check.cancel()


@dataclass(slots=True)
class Gate:
    """A stream's output gate: `feed` each engine item, `finish` at the end; `blocked` once the guard refused."""

    gate: StreamGate
    span: Any

    @property
    def blocked(self) -> bool:
        return self.gate.blocked is not None

    async def feed(self, choices: list[dict], tokens: int) -> list[dict]:
        self.gate.add(choices)
        if not self.gate.due(tokens):
            return []
        return await self._release(tokens)

    async def finish(self, tokens: int) -> list[dict]:
        if self.blocked:
            return []
        return await self._release(tokens)

    def _release(self, tokens: int):
        return judged(guardrail(self.span, "output", self.gate.moderator.route.spec.id), self.gate.release(tokens),
                      lambda _: (self.blocked, self.gate.blocked))
