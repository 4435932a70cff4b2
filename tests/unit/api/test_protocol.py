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
    ({"model": None}, "model"),
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
