"""Asks the guard model for verdicts on prompts and responses. Guard tokens are never metered to the customer.

Text longer than the guard's context is judged in windows that overlap by a quarter of their length, so a sentence
shorter than that which straddles a boundary is read whole in one window."""

from __future__ import annotations

import asyncio
import time
import uuid

from deployments.wire import GenerationRequest
from serve_app.safety.policy import GuardError, GuardPolicy, Verdict, parse_verdict
from serve_app.safety.templates import PROMPT_TEMPLATE, RESPONSE_TEMPLATE, TemplateTokens, user_tokens

CONTENT_FILTER = "content_filter"


def windows_from(ids: list[int], anchor: int, size: int) -> tuple[list[list[int]], int]:
    """The windows of at most `size` ids covering `ids[anchor:]`, each overlapping the one before by a quarter; and
    the start of the last one. A growing text is judged from that start on the next time (so each judgement costs
    at most a few windows, whatever the length, and the guard's prefix cache keeps the shared start)."""
    size = max(size, 1)
    step = max(size - size // 4, 1)
    out = [ids[anchor:anchor + size]]
    while anchor + size < len(ids):
        anchor += step
        out.append(ids[anchor:anchor + size])
    return out, anchor


def windows(ids: list[int], size: int) -> list[list[int]]:
    return windows_from(ids, 0, size)[0]


class Moderator:
    VERDICT_TOKENS = 32
    # A verdict ends at its refusal line at the latest (Qwen3Guard's response format; its prompt format has none):
    # the guard's generation stops there, so a model that does not end its turn after the verdict (the dev guard
    # repeats "Refusal: No" until max_tokens) is still read, and spends no tokens past it. What comes before the
    # stop is still parsed strictly.
    SAMPLING = {"temperature": 0.0, "stop": ["\nRefusal: Yes", "\nRefusal: No"], "include_stop_str_in_output": True}

    def __init__(self, route, timeout_s: float, metrics=None):
        self.route = route
        self.metrics = metrics
        self.tokenizer = route.tokenizer
        self.timeout_s = timeout_s
        self.prompt_template = TemplateTokens.build(PROMPT_TEMPLATE, self.tokenizer)
        self.response_template = TemplateTokens.build(RESPONSE_TEMPLATE, self.tokenizer)
        self.budget = route.spec.max_model_len - self.response_template.overhead - self.VERDICT_TOKENS
        self.response_budget = max(self.budget // 2, 1)  # the other half: the prompt's end, as context

    async def check_prompts(self, texts: list[str]) -> tuple[int, Verdict] | None:
        """The first (prompt index, verdict) that is not Safe, or None."""
        jobs = [(i, self.prompt_template.splice(w)) for i, text in enumerate(texts)
                for w in windows(user_tokens(self.tokenizer, text), self.budget)]
        found = decisive(await asyncio.gather(*(self._ask(ids) for _, ids in jobs), return_exceptions=True))
        return None if found is None else (jobs[found[0]][0], found[1])

    def context(self, prompt: str) -> list[int]:
        """The end of the prompt a response is judged against, tokenized once per request."""
        return user_tokens(self.tokenizer, prompt)[-self.response_budget:]

    async def check_response(self, prompt: str, response: str) -> Verdict:
        return await self.judge_response(self.context(prompt),
                                         windows(user_tokens(self.tokenizer, response), self.response_budget))

    async def judge_response(self, context: list[int], parts: list[list[int]]) -> Verdict:
        """The first verdict that is not Safe among the response's windows (each judged with the prompt's end)."""
        results = await asyncio.gather(*(self._ask(self.response_template.splice(context, w)) for w in parts),
                                       return_exceptions=True)
        found = decisive(results)
        return results[0] if found is None else found[1]

    async def _ask(self, ids: list[int]) -> Verdict:
        req = GenerationRequest(request_id="guard-" + uuid.uuid4().hex, prompts=[ids], prompt_texts=[None],
                                sampling=dict(self.SAMPLING), max_tokens=self.VERDICT_TOKENS)
        started = time.monotonic()
        try:
            choices, _ = await asyncio.wait_for(self.route.complete.remote(req), self.timeout_s)
        except Exception as exc:
            if self.metrics is not None:  # what the guard-unavailable alert counts (cluster/monitoring)
                self.metrics.guard_errors.inc()
            raise GuardError(f"guard unavailable: {type(exc).__name__}") from exc
        finally:
            if self.metrics is not None:
                self.metrics.guard_latency.observe(time.monotonic() - started)
        return parse_verdict(choices[0]["text"])


def decisive(results: list) -> tuple[int, Verdict] | None:
    """Of the verdicts on a request's texts (or the errors asking for them), the (index, verdict) that decides: the
    first that is not Safe. If the guard failed on any text, only an Unsafe verdict decides (it refuses under every
    policy: an unreadable answer for one text cannot turn a refusal into a 502); otherwise the failure is raised
    (fail closed)."""
    judged = [(i, r) for i, r in enumerate(results) if isinstance(r, Verdict)]
    failed = [r for r in results if not isinstance(r, Verdict)]
    if failed:
        unsafe = next(((i, v) for i, v in judged if v.safety == "Unsafe"), None)
        if unsafe is None:
            raise failed[0]
        return unsafe
    return next(((i, v) for i, v in judged if v.safety != "Safe"), None)


def withheld(index: int) -> dict:
    return {"text": "", "index": index, "logprobs": None, "finish_reason": CONTENT_FILTER}


async def moderate_choices(moderator: Moderator, prompts: list[str], n: int, choices: list[dict],
                           policy: GuardPolicy) -> list[dict]:
    """Non-streaming output moderation: every choice is checked; a blocked one is withheld."""
    verdicts = await asyncio.gather(*(moderator.check_response(prompts[c["index"] // n], c["text"])
                                      for c in choices))  # GuardError: the caller applies the failure mode
    return [withheld(c["index"]) if v.blocks(policy) else c for c, v in zip(choices, verdicts)]
