"""The engine's own tokenizer, as the ingress loads and uses it: the ingress tokenizes (for the context check, the
reservation and the bill) and sends token ids, so its ids must be the ones vLLM would make from the same text.

Loaded by vLLM's own `get_tokenizer` with the model's engine arguments (`tokenizer_mode: mistral` gives
mistral_common's tokenizer, as the engine gets), and chat rendered as vLLM's renderers do: Hugging Face templates to
text, then encoded as the template wrote it; mistral_common straight to ids (re-encoding its text gives other ids).
"""

from __future__ import annotations

from typing import Any


def load_tokenizer(weights_path: str, engine_args: dict[str, Any], simulated: bool = False):
    if simulated:
        from deployments.sim_tokenizer import sim_tokenizer

        return sim_tokenizer()
    from vllm.tokenizers import get_tokenizer

    return get_tokenizer(weights_path, tokenizer_mode=engine_args.get("tokenizer_mode", "auto"),
                         runner_type="generate", revision=engine_args.get("tokenizer_revision"),
                         trust_remote_code=bool(engine_args.get("trust_remote_code", False)))


def is_mistral(tokenizer) -> bool:
    """vLLM's MistralTokenizer (its own test, `vllm.utils.mistral.is_mistral_tokenizer`)."""
    return bool(getattr(type(tokenizer), "IS_MISTRAL_TOKENIZER", False))


def serves_chat(tokenizer) -> bool:
    return is_mistral(tokenizer) or getattr(tokenizer, "chat_template", None) is not None


def chat_render(tokenizer, turns: list[dict[str, str]], add_generation_prompt: bool = True) -> tuple[list[int], str]:
    """(token ids, text) of a conversation; the template's own errors (roles out of order) raise."""
    if is_mistral(tokenizer):
        ids = list(tokenizer.apply_chat_template(turns, add_generation_prompt=add_generation_prompt))
        return ids, tokenizer.decode(ids)
    text = tokenizer.apply_chat_template(turns, add_generation_prompt=add_generation_prompt, tokenize=False)
    return tokenizer.encode(text, add_special_tokens=False), text


def plain_tokens(tokenizer, text: str) -> list[int]:
    """Text as text: a special token typed in it stays characters (mistral_common never makes one from text)."""
    if is_mistral(tokenizer):
        return tokenizer.encode(text, add_special_tokens=False)
    return tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]
