"""What differs between `/v1/completions` and `/v1/chat/completions`, and nothing else: how the body is parsed, how
it becomes prompt token ids, what the guard reads, and the response's shape. The request path (`completions.py`)
is one for both: the same keys, admission, metering, limits, errors, metrics, traces and ledger."""

from __future__ import annotations

from typing import Any

from deployments.wire import GenerationRequest
from serve_app.api.chat_protocol import ChatCompletionRequest, parse_chat_request
from serve_app.api.encoding import ChatFrame, CompletionFrame
from serve_app.api.protocol import CompletionRequest, parse_completion_request
from serve_app.serving.prompts import (OFF_LOOP_CHARS, Prompts, chat_prompt, check_context, prompt_texts,
                                      run_off_loop, tokenize_async)


class Completions:
    id_prefix = "cmpl-"
    chat = False

    @staticmethod
    def parse(payload: Any) -> CompletionRequest:
        return parse_completion_request(payload)

    @staticmethod
    async def prompts(req: CompletionRequest, route) -> Prompts:
        return await tokenize_async(req, route.spec, route.tokenizer)

    @staticmethod
    def guard_texts(req: CompletionRequest, prompts: Prompts, tokenizer) -> list[str]:
        return prompt_texts(prompts, tokenizer)

    @staticmethod
    def logprobs(req: CompletionRequest) -> int | None:
        return req.logprobs

    @staticmethod
    def frame(completion_id: str, created: int, model: str, req: CompletionRequest) -> CompletionFrame:
        return CompletionFrame(completion_id, created, model, req.include_usage, req.continuous_usage)

    @staticmethod
    def generation(completion_id: str, req: CompletionRequest, prompts: Prompts) -> GenerationRequest:
        return GenerationRequest(
            request_id=completion_id, prompts=prompts.ids, prompt_texts=prompts.texts, sampling=req.sampling(),
            n=req.choices_per_prompt, best_of=req.best_of, logprobs=req.logprobs, echo=bool(req.echo),
            max_tokens=req.max_tokens_or_default, return_token_ids=bool(req.return_token_ids),
            priority=req.priority or 0, prompt_logprobs=req.prompt_logprobs)


class Chat:
    """Messages are rendered with the model's own chat template (from its tokenizer's configuration), then
    tokenized as the template wrote them (it places the special tokens itself), as vLLM's chat does."""

    id_prefix = "chatcmpl-"
    chat = True

    @staticmethod
    def parse(payload: Any) -> ChatCompletionRequest:
        return parse_chat_request(payload)

    @staticmethod
    async def prompts(req: ChatCompletionRequest, route) -> Prompts:
        size = sum(len(m.text) for m in req.messages)
        if size < OFF_LOOP_CHARS:
            return render_chat(req, route)
        return await run_off_loop(render_chat, req, route)

    @staticmethod
    def guard_texts(req: ChatCompletionRequest, prompts: Prompts, tokenizer) -> list[str]:
        """The conversation first (what responses are judged against), then each of the customer's own messages
        on its own: the guard judges the last user turn of a conversation, so a harmful system message or earlier
        turn (or a forged "USER:" line) would otherwise go unjudged."""
        texts = [conversation(req)]
        texts += [m.text for m in req.messages if m.role != "assistant" and m.text and m.text not in texts]
        return texts

    @staticmethod
    def logprobs(req: ChatCompletionRequest) -> int | None:
        return req.logprobs_count

    @staticmethod
    def frame(completion_id: str, created: int, model: str, req: ChatCompletionRequest) -> ChatFrame:
        return ChatFrame(completion_id, created, model, req.include_usage, req.top_logprobs, req.choices_per_prompt,
                         req.continuous_usage)

    @staticmethod
    def generation(completion_id: str, req: ChatCompletionRequest, prompts: Prompts) -> GenerationRequest:
        return GenerationRequest(
            request_id=completion_id, prompts=prompts.ids, prompt_texts=prompts.texts, sampling=req.sampling(),
            n=req.choices_per_prompt, logprobs=req.logprobs_count, max_tokens=req.max_tokens_or_default, chat=True,
            return_token_ids=bool(req.return_token_ids), priority=req.priority or 0,
            prompt_logprobs=req.prompt_logprobs)


def render_chat(req: ChatCompletionRequest, route) -> Prompts:
    ids, text = chat_prompt(route.tokenizer, req.messages, route.spec.id)
    requested = req.requested_max_tokens
    check_context([ids], requested if requested is not None else 1, route.spec.max_model_len)
    req.resolve_max_tokens(len(ids), route.spec.max_model_len)
    return Prompts([ids], [text])


def conversation(req: ChatCompletionRequest) -> str:
    """The conversation as Qwen3Guard reads one ("USER: ...", "ASSISTANT: ...", the last user turn judged in its
    context); the guard's template writes the first "USER: ". System and developer text is the customer's too, so
    it is read as theirs."""
    turns = [f"{'ASSISTANT' if m.role == 'assistant' else 'USER'}: {m.text}" for m in req.messages]
    text = "\n\n".join(turns)
    return text[len("USER: "):] if text.startswith("USER: ") else text


ENDPOINTS = {"completions": Completions, "chat.completions": Chat}
