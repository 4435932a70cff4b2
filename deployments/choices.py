"""Turns engine outputs into OpenAI `choices[]` entries: text deltas, finish reasons and the logprobs object.

Pure logic over vLLM's `Logprob` shape (`logprob`, `rank`, `decoded_token`), so it is unit-tested without an engine.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

LOGPROB_FLOOR = -9999.0
FINISH_REASONS = {"stop": "stop", "length": "length"}  # any other ending that is not a failure reads as "stop"
ENGINE_FAILED = frozenset({"abort", "error"})  # vLLM's FinishReason values that are the engine's failures


def _clamp(value: float) -> float:
    return value if value > LOGPROB_FLOOR else LOGPROB_FLOOR


@dataclass(slots=True)
class ChoiceCursor:
    """Per-choice state across stream fragments: where the next token starts in the choice's text."""

    index: int
    offset: int = 0
    started: bool = False


def logprobs_block(
    cursor: ChoiceCursor,
    token_ids: Sequence[int],
    positions: Sequence[Mapping[int, Any] | None],
    top_n: int,
    decode: Callable[[int], str],
) -> dict[str, list]:
    """The OpenAI logprobs object for these tokens; `top_logprobs` has the sampled token plus up to `top_n` more."""
    tokens: list[str] = []
    token_logprobs: list[float | None] = []
    top_logprobs: list[dict[str, float] | None] = []
    text_offset: list[int] = []
    for token_id, position in zip(token_ids, positions):
        sampled = position.get(token_id) if position else None
        text = sampled.decoded_token if sampled is not None and sampled.decoded_token is not None else decode(token_id)
        tokens.append(text)
        text_offset.append(cursor.offset)
        cursor.offset += len(text)
        if sampled is None:
            token_logprobs.append(None)
            top_logprobs.append(None)
            continue
        token_logprobs.append(_clamp(sampled.logprob))
        top: dict[str, float] = {text: _clamp(sampled.logprob)}
        ranked = sorted(
            ((lp.rank or 0, tid, lp) for tid, lp in position.items() if tid != token_id), key=lambda r: r[0])
        for _, tid, lp in ranked[:top_n]:
            top.setdefault(lp.decoded_token if lp.decoded_token is not None else decode(tid), _clamp(lp.logprob))
        top_logprobs.append(top)
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top_logprobs,
            "text_offset": text_offset}


def merge_logprobs(first: dict[str, list] | None, second: dict[str, list] | None) -> dict[str, list] | None:
    if first is None:
        return second
    if second is None:
        return first
    return {key: first[key] + second[key] for key in second}


def merge_fragments(fragments: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One entry per choice index, in index order. Deltas that queued up while the previous item was being sent
    go out as one: clients read one entry per index per chunk (`chunk.choices[0].text`)."""
    merged: dict[int, dict[str, Any]] = {}
    for fragment in fragments:
        into = merged.get(fragment["index"])
        if into is None:
            merged[fragment["index"]] = fragment
            continue
        into["text"] += fragment["text"]
        into["logprobs"] = merge_logprobs(into["logprobs"], fragment["logprobs"])
        into["finish_reason"] = fragment["finish_reason"] or into["finish_reason"]
        if "token_ids" in fragment:
            into["token_ids"] = into.get("token_ids", []) + fragment["token_ids"]
    return [merged[i] for i in sorted(merged)]


def prompt_logprobs_list(prompt_ids: Sequence[int], positions: Sequence[Mapping[int, Any] | None], top_n: int,
                         decode: Callable[[int], str]) -> list[dict[str, dict] | None]:
    """vLLM's `prompt_logprobs`: per prompt token (the first has none), its own and `top_n` more, by token id."""
    out: list[dict[str, dict] | None] = []
    for token_id, position in zip(prompt_ids, positions):
        if not position:
            out.append(None)
            continue
        ranked = sorted(position.items(), key=lambda kv: (kv[0] != token_id, kv[1].rank or 0))[: top_n + 1]
        out.append({str(tid): {"logprob": _clamp(lp.logprob), "rank": lp.rank,
                               "decoded_token": lp.decoded_token if lp.decoded_token is not None else decode(tid)}
                    for tid, lp in ranked})
    return out


def with_token_ids(fragment: dict[str, Any], first: bool, prompt_ids: Sequence[int], ids: Sequence[int]
                   ) -> dict[str, Any]:
    """`return_token_ids`: the ids of this fragment, and the prompt's on a choice's first fragment (vLLM's)."""
    fragment["token_ids"] = list(ids)
    if first:
        fragment["prompt_token_ids"] = list(prompt_ids)
    return fragment


def echo_text(prompt_text: str | None, prompt_ids: Sequence[int], tokenizer) -> str:
    """What `echo` prepends: the prompt as sent, or token-id prompts decoded."""
    return prompt_text if prompt_text is not None else tokenizer.decode(prompt_ids, skip_special_tokens=True)


def finish_reason(engine_reason: str | None) -> str | None:
    """Maps vLLM's finish reason. A sequence the engine aborted or ended in error (a grammar that rejected the
    sampled token, a failed preprocessing or KV load) is the engine's failure, never a finish the client may take
    for success and be charged for: upstream_error (in-band for a stream, which pays what it received)."""
    if engine_reason is None:
        return None
    if engine_reason in ENGINE_FAILED:  # the engine raises its EngineFailure first (deployments/engine.py)
        raise RuntimeError(f"the engine ended the sequence with '{engine_reason}'")
    return FINISH_REASONS.get(engine_reason, "stop")


def mean_logprob(cumulative: float | None, tokens: int) -> float:
    """The best_of ranking key: mean log probability per generated token."""
    if cumulative is None:
        return float("-inf")
    return cumulative / max(tokens, 1)


def chat_logprobs(block: dict | None, top: int) -> dict | None:
    """A completions logprobs object as chat's: one entry per token, with its bytes and `top` alternatives."""
    if block is None:
        return None
    content = []
    for token, logprob, alternatives in zip(block["tokens"], block["token_logprobs"], block["top_logprobs"]):
        ranked = sorted((alternatives or {}).items(), key=lambda kv: -kv[1])[:top]
        content.append({"token": token, "logprob": LOGPROB_FLOOR if logprob is None else logprob,
                        "bytes": list(token.encode()),
                        "top_logprobs": [{"token": t, "logprob": v, "bytes": list(t.encode())} for t, v in ranked]})
    return {"content": content, "refusal": None}


def chat_deltas(choices: list[dict], top: int | None) -> list[dict]:
    """Completion choice fragments as chat.completion.chunk choices (the role went in the stream's first chunk)."""
    return [_ids({"index": c["index"], "delta": {"content": c["text"]} if c["text"] else {},
                  "logprobs": chat_logprobs(c["logprobs"], top or 0), "finish_reason": c["finish_reason"]}, c)
            for c in choices]


def chat_messages(choices: list[dict], top: int | None) -> list[dict]:
    """Whole completion choices as chat.completion choices."""
    return [_ids({"index": c["index"], "message": {"role": "assistant", "content": c["text"], "refusal": None},
                  "logprobs": chat_logprobs(c["logprobs"], top or 0), "finish_reason": c["finish_reason"]}, c)
            for c in choices]


def _ids(out: dict, choice: dict) -> dict:
    for key in ("token_ids", "prompt_token_ids", "prompt_logprobs"):
        if key in choice:
            out[key] = choice[key]
    return out
