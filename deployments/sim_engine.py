"""A simulated engine with `Engine`'s interface: deterministic text at a set pace, with injectable faults.

It lets the gateway (routing, streaming, metering, the guard, failure handling) be exercised without vLLM, torch or
a GPU: output is the configured text cycled, produced in steps of a shared clock as a batched engine would.
"""

from __future__ import annotations

import asyncio
import math
import re
from collections import namedtuple
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing
from enum import Enum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from deployments.choices import (ChoiceCursor, echo_text, logprobs_block, merge_fragments, merge_logprobs,
                                 prompt_logprobs_list, with_token_ids)
from deployments.sim_tokenizer import sim_tokenizer
from deployments.wire import EngineFailure, GenerationRequest, InvalidSampling, StreamItem, Usage

SIM_LOGPROB = -0.5
UNSAFE, SAFE = "Safety: Unsafe\nCategories: Violent", "Safety: Safe\nCategories: None"
_DIRECTIVE = re.compile(r"\[\[sim\b([^\]]*)\]\]")


class Fault(str, Enum):
    NONE = "none"
    DIE = "die"  # the replica process dies mid-stream (on_die)
    HANG = "hang"  # never produces another token
    RAISE = "raise"  # the engine raises EngineFailure
    SLOW = "slow"  # steps take slow_factor times longer


class SimConfig(BaseModel):
    """Per-model configuration of a simulated model. A fault engages once the request has produced
    `fault_after_tokens` tokens over all its choices (0: before the first), checked at every step boundary."""

    model_config = ConfigDict(extra="forbid")

    step_s: float = Field(0.02, gt=0)
    tokens_per_step: int = Field(1, ge=1)
    text: str = Field(" Ottawa. The quick brown fox jumps over the lazy dog.", min_length=1)
    unsafe_words: list[str] = []  # non-empty: a Qwen3Guard-format safety model
    fault: Fault = Fault.NONE
    fault_after_tokens: int = Field(0, ge=0)
    slow_factor: float = Field(10, ge=1)


def parse_directive(text: str | None) -> dict[str, Any]:
    """`[[sim fault=die after=5]]` in a prompt overrides the fault for that request; anything else in it is a 400."""
    match = _DIRECTIVE.search(text or "")
    if match is None:
        return {}
    out: dict[str, Any] = {}
    for part in match.group(1).split():
        key, _, value = part.partition("=")
        try:
            if key == "fault":
                out["fault"] = Fault(value)
            elif key == "after" and value.isdigit():
                out["fault_after_tokens"] = int(value)
            else:
                raise ValueError(part)
        except ValueError as exc:
            raise InvalidSampling(f"bad sim directive {part!r}: use [[sim fault=none|die|hang|raise|slow after=N]]"
                                  ) from exc
    return out


class StepClock:
    """One clock per engine: every waiter wakes on the same step, so concurrent streams advance together as in a
    batched engine. The ticking task runs only while someone waits (it lingers one idle step, keeping the phase for
    streams that come back for the next step) and is gone after `close()`."""

    def __init__(self, step_s: float, slow_factor: float = 10):
        self.step_s = step_s
        self.slow_steps = max(1, math.ceil(slow_factor))
        self.steps = 0
        self._waiters: list[list] = []  # [steps left, future]
        self._task: asyncio.Task | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed = False

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    async def tick(self, slow: bool = False) -> None:
        if self._closed:
            raise EngineFailure("engine shut down")
        self._loop = asyncio.get_running_loop()
        entry = [self.slow_steps if slow else 1, self._loop.create_future()]
        self._waiters.append(entry)
        if not self.running:
            self._task = self._loop.create_task(self._run(), name="sim-step-clock")
        try:
            await entry[1]
        finally:
            if entry in self._waiters:
                self._waiters.remove(entry)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time()
        while True:
            deadline = max(deadline + self.step_s, loop.time())
            await asyncio.sleep(deadline - loop.time())
            if not self._waiters:
                return
            self.steps += 1
            for entry in list(self._waiters):
                entry[0] -= 1
                if entry[0] <= 0:
                    self._waiters.remove(entry)
                    if not entry[1].done():
                        entry[1].set_result(None)

    def close(self) -> None:
        """Safe from any thread: the loop's own work is scheduled on it."""
        self._closed = True
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._stop)

    def _stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
        for _, future in self._waiters:
            if not future.done():
                future.set_exception(EngineFailure("engine shut down"))
        self._waiters.clear()


_Logprob = namedtuple("_Logprob", "logprob rank decoded_token")  # vLLM's shape, read by choices.logprobs_block
_Script = namedtuple("_Script", "ids pieces length finish")  # every choice of a prompt: ids/pieces cycled to length


class SimEngine:
    def __init__(self, model_id: str, config: SimConfig, on_die: Callable[[], None] | None = None):
        self.model_id = model_id
        self.config = config
        self.on_die = on_die or _raise_death
        self.clock: StepClock | None = None
        self._tokenizer = None
        self._text: tuple[list[int], list[str]] = ([], [])
        self._hanging: set[asyncio.Future] = set()  # requests in a HANG fault, released by shutdown()

    async def start(self) -> None:
        self._tokenizer = sim_tokenizer()
        self._text = self._pieces(self.config.text)
        self.clock = StepClock(self.config.step_s, self.config.slow_factor)

    def shutdown(self) -> None:
        if self.clock is not None:
            self.clock.close()
            self.clock = None
        for waiter in list(self._hanging):
            if not waiter.get_loop().is_closed():
                waiter.get_loop().call_soon_threadsafe(lambda w=waiter: w.done() or w.set_result(None))

    async def check_health(self) -> None:
        if self.clock is None:
            raise EngineFailure("engine not started")

    async def stream(self, req: GenerationRequest) -> AsyncIterator[StreamItem]:
        """One item per engine step, with a fragment for each choice the step advanced."""
        async with aclosing(self._steps(req, req.n)) as steps:
            async for fragments, usage in steps:
                yield StreamItem(choices=merge_fragments(fragments),
                                 usage=Usage(usage.prompt_tokens, usage.completion_tokens))

    async def complete(self, req: GenerationRequest) -> tuple[list[dict[str, Any]], Usage]:
        """With best_of > n, all candidates are generated and billed; they are identical, so the n kept are the
        lowest indices (the tie-break of ranking by mean logprob)."""
        candidates = max(req.best_of or req.n, req.n)
        fragments, usage = [], Usage(prompt_tokens=req.prompt_tokens)
        async with aclosing(self._steps(req, candidates)) as steps:
            async for step, usage in steps:
                fragments += step
        choices = []
        for c in merge_fragments(fragments):
            prompt_idx, j = divmod(c["index"], candidates)
            if j < req.n:
                choices.append(dict(c, index=prompt_idx * req.n + j))
        return choices, usage

    async def _steps(self, req: GenerationRequest, per_prompt: int):
        """(fragments, cumulative usage) per step; the fault is checked at every step boundary."""
        clock = self.clock  # shutdown() clears it; this request keeps its own
        if clock is None:
            raise EngineFailure("engine not started")
        override = parse_directive(req.prompt_texts[0] if req.prompt_texts else None)
        fault = override.get("fault", self.config.fault)
        after = override.get("fault_after_tokens", self.config.fault_after_tokens)
        scripts = [self._script(req, i) for i in range(len(req.prompts))]
        longest = max(s.length for s in scripts)
        chunk = longest if self.config.unsafe_words else self.config.tokens_per_step
        cursors = [(i, ChoiceCursor(index=i * per_prompt + j)) for i in range(len(req.prompts))
                   for j in range(per_prompt)]
        usage = Usage(prompt_tokens=req.prompt_tokens)
        pos = 0
        while True:
            await self._fault_point(fault, after, usage.completion_tokens)
            if pos and pos >= longest:
                return
            await clock.tick(slow=fault is Fault.SLOW and usage.completion_tokens >= after)
            fragments = [self._fragment(req, cursor, i, scripts[i], pos, pos + chunk, usage)
                         for i, cursor in cursors if pos < scripts[i].length or pos == 0]
            pos += max(chunk, 1)
            yield fragments, usage

    async def _fault_point(self, fault: Fault, after: int, produced: int) -> None:
        if produced < after or fault in (Fault.NONE, Fault.SLOW):
            return
        if fault is Fault.DIE:
            self.on_die()
            raise EngineFailure("simulated replica death")
        if fault is Fault.RAISE:
            raise EngineFailure(f"simulated engine failure after {produced} tokens")
        waiter = asyncio.get_running_loop().create_future()  # HANG: until cancelled or shut down
        self._hanging.add(waiter)
        try:
            await waiter
        finally:
            self._hanging.discard(waiter)
        raise EngineFailure("engine shut down")

    def _script(self, req: GenerationRequest, prompt_idx: int) -> _Script:
        if req.max_tokens == 0:  # scoring mode: no output, as vLLM's is dropped
            return _Script([], [], 0, "length")
        if not self.config.unsafe_words:
            return _Script(*self._text, req.max_tokens, "length")
        prompt = self._tokenizer.decode(req.prompts[prompt_idx], skip_special_tokens=True).lower()
        verdict = UNSAFE if any(w.lower() in prompt for w in self.config.unsafe_words) else SAFE
        ids, pieces = self._pieces(verdict)
        return _Script(ids, pieces, len(ids), "stop")

    def _pieces(self, text: str) -> tuple[list[int], list[str]]:
        """Token ids and the text each adds; a byte that ends no character adds "" (held back, as vLLM's
        incremental detokenizer does), so the pieces always join to the text."""
        ids = self._tokenizer.encode(text, add_special_tokens=False)
        pieces, pending = [], []
        for token_id in ids:
            pending.append(token_id)
            piece = self._tokenizer.decode(pending)
            if piece.endswith("\ufffd") and len(pending) < 4:
                pieces.append("")
            else:
                pieces.append(piece)
                pending = []
        if pending:  # the text ends in what looks like a partial character
            pieces[-1] = self._tokenizer.decode(pending)
        return ids, pieces

    def _fragment(self, req: GenerationRequest, cursor: ChoiceCursor, prompt_idx: int, script: _Script,
                  start: int, stop: int, usage: Usage) -> dict[str, Any]:
        stop = min(stop, script.length)
        span = range(start, stop)
        ids = [script.ids[p % len(script.ids)] for p in span]
        pieces = [script.pieces[p % len(script.pieces)] for p in span]
        usage.completion_tokens += len(ids)
        text, logprobs = "".join(pieces), None
        if req.echo and not cursor.started:
            text = echo_text(req.prompt_texts[prompt_idx], req.prompts[prompt_idx], self._tokenizer) + text
            if req.logprobs is not None:
                prompt = req.prompts[prompt_idx]
                positions = [None] + [{t: _Logprob(SIM_LOGPROB, 1, None)} for t in prompt[1:]]
                logprobs = logprobs_block(cursor, prompt, positions, req.logprobs, self._decode)
        if req.logprobs is not None:
            positions = [{t: _Logprob(SIM_LOGPROB, 1, p)} for t, p in zip(ids, pieces)]
            logprobs = merge_logprobs(logprobs, logprobs_block(cursor, ids, positions, req.logprobs, self._decode))
        first = not cursor.started
        cursor.started = True
        out = {"text": text, "index": cursor.index, "logprobs": logprobs,
               "finish_reason": script.finish if stop >= script.length else None}
        if first and req.prompt_logprobs is not None:
            prompt = req.prompts[prompt_idx]
            positions = [None] + [{t: _Logprob(SIM_LOGPROB, 1, None)} for t in prompt[1:]]
            out["prompt_logprobs"] = prompt_logprobs_list(prompt, positions, req.prompt_logprobs, self._decode)
        return with_token_ids(out, first, req.prompts[prompt_idx], ids) if req.return_token_ids else out

    def _decode(self, token_id: int) -> str:
        return self._tokenizer.decode([token_id])


def _raise_death() -> None:
    raise EngineFailure("simulated replica death")
