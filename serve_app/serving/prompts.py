"""The four prompt forms -> token ids, with the checks that need the tokenizer: ids in the vocabulary, suffix
support, and prompt plus max_tokens within the model's context."""

from __future__ import annotations

from dataclasses import dataclass

from deployments.choices import echo_text
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
    _check_context(ids, req.max_tokens_or_default, spec.max_model_len)
    return Prompts(ids, texts)


def prompt_texts(prompts: Prompts, tokenizer) -> list[str]:
    """What the guard reads: the prompt text, or token-id prompts decoded."""
    return [echo_text(t, ids, tokenizer) for t, ids in zip(prompts.texts, prompts.ids)]


def _check_context(ids: list[list[int]], max_tokens: int, limit: int) -> None:
    longest = max(len(p) for p in ids)
    if longest >= limit:
        raise invalid(f"This model's maximum context length is {limit} tokens, however your prompt has "
                      f"{longest} tokens. Please reduce the length of the prompt.", "prompt")
    if longest + max_tokens > limit:
        raise invalid(f"This model's maximum context length is {limit} tokens, however you requested "
                      f"{longest + max_tokens} tokens ({longest} in your prompt; {max_tokens} for the "
                      f"completion). Please reduce your prompt or max_tokens.", "max_tokens")
