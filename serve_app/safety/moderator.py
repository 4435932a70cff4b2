"""Asks the guard model for verdicts on prompts and responses. Guard tokens are never metered to the customer."""

from __future__ import annotations

import asyncio
import time
import uuid

from deployments.wire import GenerationRequest
from serve_app.safety.policy import GuardError, GuardPolicy, Verdict, parse_verdict
from serve_app.safety.templates import PROMPT_TEMPLATE, RESPONSE_TEMPLATE, TemplateTokens, user_tokens

CONTENT_FILTER = "content_filter"


class Moderator:
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


def withheld(index: int) -> dict:
    return {"text": "", "index": index, "logprobs": None, "finish_reason": CONTENT_FILTER}


async def moderate_choices(moderator: Moderator, prompts: list[str], n: int, choices: list[dict],
                           policy: GuardPolicy) -> list[dict]:
    """Non-streaming output moderation: every choice is checked; a blocked one is withheld."""
    verdicts = await asyncio.gather(*(moderator.check_response(prompts[c["index"] // n], c["text"])
                                      for c in choices))  # GuardError: the caller applies the failure mode
    return [withheld(c["index"]) if v.blocks(policy) else c for c, v in zip(choices, verdicts)]
