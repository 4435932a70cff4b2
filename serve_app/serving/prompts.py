"""The four prompt forms -> token ids, with the checks that need the tokenizer: ids in the vocabulary, suffix
support, and prompt plus max_tokens within the model's context."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from deployments.tokenizers import chat_render
from serve_app.api.errors import invalid
from serve_app.api.protocol import MAX_CHOICES, MAX_PROMPTS, CompletionRequest
from serve_app.config.service import ModelSpec


@dataclass(slots=True)
class Prompts:
    ids: list[list[int]]
    texts: list[str | None]

    @property
    def tokens(self) -> int:
        return sum(len(p) for p in self.ids)


def normalise(prompt) -> list[str | list[int]]:
    if isinstance(prompt, str):
        return [prompt]
    if prompt and isinstance(prompt[0], int):
        return [prompt]
    return list(prompt)


OFF_LOOP_CHARS = 16_384  # prompts at least this long (characters or token ids) are tokenized in the worker thread
_worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="qbt-tokenize")


async def tokenize_async(req: CompletionRequest, spec: ModelSpec, tokenizer) -> Prompts:
    """Long prompts are tokenized in one worker thread, one at a time: the tokenizer releases the GIL, so the event
    loop goes on forwarding every other stream meanwhile (a 900 KB prompt takes about 0.7 s here, which on the loop
    would stall them all). Short ones stay on the loop, where a thread hop would cost more than they do."""
    if prompt_size(req) < OFF_LOOP_CHARS:
        return tokenize(req, spec, tokenizer)
    return await run_off_loop(tokenize, req, spec, tokenizer)


async def run_off_loop(fn, *args):
    """`fn(*args)` in the one tokenizing thread."""
    return await asyncio.get_running_loop().run_in_executor(_worker, fn, *args)


def prompt_size(req: CompletionRequest) -> int:
    return sum(len(item) for item in normalise(req.prompt)) + len(req.suffix or "")


def tokenize(req: CompletionRequest, spec: ModelSpec, tokenizer) -> Prompts:
    items = normalise(req.prompt)
    if len(items) > MAX_PROMPTS:
        raise invalid(f"At most {MAX_PROMPTS} prompts per request, got {len(items)}", "prompt")
    if len(items) * req.choices_per_prompt > MAX_CHOICES:
        raise invalid(f"prompts x n must be at most {MAX_CHOICES}", "n")
    if req.suffix is not None and spec.fim_template is None:
        raise invalid(f"suffix is not supported by the model '{spec.id}'", "suffix")
    vocab = len(tokenizer)
    ids: list[list[int]] = []
    texts: list[str | None] = []
    for item in items:
        if isinstance(item, str):
            text = spec.fim_template.format(prefix=item, suffix=req.suffix) if req.suffix is not None else item
            tokens = tokenizer.encode(text)
            texts.append(text)
        else:
            bad = next((t for t in item if t >= vocab), None)
            if bad is not None:
                raise invalid(f"Token id {bad} is outside the model's vocabulary (size {vocab})", "prompt")
            tokens = list(item)
            texts.append(None)
        if not tokens:
            raise invalid("The prompt is empty after tokenization", "prompt")
        ids.append(tokens)
    check_context(ids, req.max_tokens_or_default, spec.max_model_len)
    return Prompts(ids, texts)


def prompt_texts(prompts: Prompts, tokenizer) -> list[str]:
    """What the guard reads: the text the model sees. Token-id prompts are decoded with their special tokens kept
    (as their literal text, which the guard reads as plain characters), so a forged turn or role in ids is judged
    as it is, not with those tokens silently dropped."""
    return [t if t is not None else tokenizer.decode(ids, skip_special_tokens=False)
            for t, ids in zip(prompts.texts, prompts.ids)]


def check_context(ids: list[list[int]], max_tokens: int, limit: int) -> None:
    longest = max(len(p) for p in ids)
    if longest >= limit:
        raise invalid(f"This model's maximum context length is {limit} tokens, however your prompt has "
                      f"{longest} tokens. Please reduce the length of the prompt.", "prompt")
    if longest + max_tokens > limit:
        raise invalid(f"This model's maximum context length is {limit} tokens, however you requested "
                      f"{longest + max_tokens} tokens ({longest} in your prompt; {max_tokens} for the "
                      f"completion). Please reduce your prompt or max_tokens.", "max_tokens")


def chat_prompt(tokenizer, messages, model_id: str, add_generation_prompt: bool = True) -> tuple[list[int], str]:
    """Chat messages rendered with the model's chat template, as the engine would (`deployments/tokenizers.py`);
    developer turns are system turns to templates. (token ids, text)."""
    turns = [{"role": "system" if m.role == "developer" else m.role, "content": m.text} for m in messages]
    try:
        return chat_render(tokenizer, turns, add_generation_prompt)
    except Exception as exc:  # a template's own checks (roles out of order, for one) raise from Jinja
        raise invalid(f"The model '{model_id}' cannot take these messages: {str(exc)[:300]}", "messages") from None
