from __future__ import annotations

import math
from dataclasses import dataclass

import pytest

from deployments.choices import (ChoiceCursor, finish_reason, logprobs_block, mean_logprob, merge_fragments,
                                 merge_logprobs)


@dataclass
class Lp:
    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


def test_block_aligns_and_advances_offsets():
    cursor = ChoiceCursor(index=0, offset=3)
    positions = [{5: Lp(-0.1, 1, " a"), 6: Lp(-2.0, 2, " b")}, {7: Lp(-0.5, 2, "cd"), 8: Lp(-0.2, 1, "x")}]
    block = logprobs_block(cursor, [5, 7], positions, top_n=1, decode=lambda t: "?")
    assert block["tokens"] == [" a", "cd"]
    assert block["token_logprobs"] == [-0.1, -0.5]
    assert block["text_offset"] == [3, 5]
    assert block["top_logprobs"] == [{" a": -0.1, " b": -2.0}, {"cd": -0.5, "x": -0.2}]
    assert cursor.offset == 7


def test_first_prompt_position_is_null_and_inf_is_clamped():
    cursor = ChoiceCursor(index=0)
    block = logprobs_block(cursor, [1, 2], [None, {2: Lp(-math.inf, 1, "z")}], top_n=0, decode=lambda t: "<s>")
    assert block["token_logprobs"] == [None, -9999.0]
    assert block["top_logprobs"] == [None, {"z": -9999.0}]
    assert block["tokens"] == ["<s>", "z"]


def test_top_n_zero_keeps_only_the_sampled_token():
    block = logprobs_block(ChoiceCursor(0), [5], [{5: Lp(-0.3, 2, "a"), 9: Lp(-0.1, 1, "b")}], 0, str)
    assert block["top_logprobs"] == [{"a": -0.3}]


def test_merge_concatenates():
    a = {"tokens": ["a"], "token_logprobs": [None], "top_logprobs": [None], "text_offset": [0]}
    b = {"tokens": ["b"], "token_logprobs": [-1.0], "top_logprobs": [{"b": -1.0}], "text_offset": [1]}
    assert merge_logprobs(a, b)["tokens"] == ["a", "b"]
    assert merge_logprobs(None, b) is b


def test_queued_fragments_merge_to_one_entry_per_index():
    a = {"tokens": ["a"], "token_logprobs": [-0.5], "top_logprobs": [None], "text_offset": [0]}
    b = {"tokens": ["b"], "token_logprobs": [-1.0], "top_logprobs": [None], "text_offset": [1]}
    merged = merge_fragments([
        {"index": 1, "text": "x", "logprobs": None, "finish_reason": None},
        {"index": 0, "text": "a", "logprobs": a, "finish_reason": None},
        {"index": 0, "text": "b", "logprobs": b, "finish_reason": "length"},
        {"index": 1, "text": "y", "logprobs": None, "finish_reason": None},
    ])
    assert [(c["index"], c["text"], c["finish_reason"]) for c in merged] == [(0, "ab", "length"), (1, "xy", None)]
    assert merged[0]["logprobs"]["text_offset"] == [0, 1] and merged[1]["logprobs"] is None


def test_finish_reasons():
    assert finish_reason(None) is None
    assert finish_reason("length") == "length"
    assert finish_reason("stop") == "stop"
    assert finish_reason("repetition") == "stop"
    for failed in ("abort", "error"):
        with pytest.raises(RuntimeError):
            finish_reason(failed)


def test_mean_logprob_ranks_per_token():
    assert mean_logprob(-4.0, 4) > mean_logprob(-3.0, 2)
    assert mean_logprob(None, 3) == float("-inf")
