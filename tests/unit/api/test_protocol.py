from __future__ import annotations

import pytest

from serve_app.api.errors import ApiError
from serve_app.api.protocol import parse_completion_request

BASE = {"model": "m", "prompt": "hi"}


def test_defaults():
    req = parse_completion_request(BASE)
    assert req.max_tokens == 16 and req.n == 1 and not req.stream and req.sampling() == {}


@pytest.mark.parametrize("prompt", ["x", ["a", "b"], [1, 2], [[1], [2, 3]], ""])
def test_four_prompt_forms(prompt):
    assert parse_completion_request({**BASE, "prompt": prompt}).prompt == prompt


@pytest.mark.parametrize("patch, param", [
    ({"prompt": [1, "a"]}, "prompt"),
    ({"prompt": [True]}, "prompt"),
    ({"max_tokens": 1.5}, "max_tokens"),
    ({"stream": "yes"}, "stream"),
    ({"stream_options": {"include_usage": "y"}, "stream": True}, "stream_options.include_usage"),
    ({"stream_options": {"bogus": True}, "stream": True}, "stream_options.bogus"),
    ({"stop": [1]}, "stop"),
    ({"min_tokens": 20, "max_tokens": 10}, "min_tokens"),
    ({"min_tokens": 20, "max_tokens": None}, "min_tokens"),  # null is the default, 16
    ({"model": None}, "model"),
    # What vLLM's SamplingParams (or its engine's intake) would refuse is refused here, naming the field.
    ({"echo": True, "suffix": "}"}, "echo"),
    ({"top_p": 0}, "top_p"),
    ({"stop": ""}, "stop"),
    ({"stop": ["x", ""]}, "stop"),
    ({"bad_words": [""]}, "bad_words"),
    ({"logit_bias": {"\u00b2": 1}}, "logit_bias"),  # a digit to str.isdigit, not to int()
    ({"logit_bias": {"\u0663": 1}}, "logit_bias"),  # an Arabic-Indic 3: token ids are ASCII
    ({"logit_bias": {"1" * 11: 1}}, "logit_bias"),
    ({"top_k": 2**63}, "top_k"),
    ({"priority": -2**63 - 1}, "priority"),
])
def test_errors_name_the_field(patch, param):
    with pytest.raises(ApiError) as info:
        parse_completion_request({**BASE, **patch})
    assert info.value.param == param and info.value.status == 400
    assert info.value.envelope()["error"]["code"] == "invalid_request"


def test_non_object_body():
    with pytest.raises(ApiError) as info:
        parse_completion_request([BASE])
    assert info.value.param is None


def test_sampling_passes_only_what_was_set():
    req = parse_completion_request({**BASE, "temperature": 0, "stop": "\n", "top_k": 5, "logit_bias": {"7": -1}})
    assert req.sampling() == {"temperature": 0, "stop": ["\n"], "top_k": 5, "logit_bias": {"7": -1}}


def test_integers_are_accepted_as_floats():
    assert parse_completion_request({**BASE, "temperature": 1}).temperature == 1.0


def test_include_usage_only_when_streaming():
    req = parse_completion_request({**BASE, "stream": True, "stream_options": {"include_usage": True}})
    assert req.include_usage


def test_the_bounds_themselves_are_accepted():
    req = parse_completion_request({**BASE, "top_p": 1e-9, "stop": ["x"], "bad_words": ["y"], "top_k": 2**63 - 1,
                                    "priority": -2**63, "logit_bias": {"1" * 10: 1}, "min_tokens": 16})
    assert req.sampling()["top_k"] == 2**63 - 1 and req.priority == -2**63


def test_chat_min_tokens_is_checked_against_what_the_context_leaves():
    from serve_app.api.chat_protocol import parse_chat_request

    ask = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    assert parse_chat_request({**ask, "min_tokens": 90}).resolve_max_tokens(10, 100) == 90
    with pytest.raises(ApiError) as info:
        parse_chat_request({**ask, "min_tokens": 91}).resolve_max_tokens(10, 100)
    assert info.value.param == "min_tokens" and info.value.status == 400
