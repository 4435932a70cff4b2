"""The SSE framing: chunks built from the per-response head and tail are the JSON objects OpenAI's clients parse."""

from __future__ import annotations

import json

import pytest

from serve_app.api.encoding import CompletionFrame, dumps, event


@pytest.mark.parametrize("include_usage", [False, True])
def test_chunks_are_the_whole_object_framed_as_one_event(include_usage):
    frame = CompletionFrame("cmpl-1", 1700000000, "m\u00e9", include_usage)
    choices = [{"text": "caf\u00e9 \"q\"", "index": 0, "logprobs": None, "finish_reason": None}]
    expected = event(frame.obj(choices, None))
    assert frame.chunk(choices) == expected
    assert frame.rendered_chunk(dumps(choices)) == expected
    body = json.loads(expected[len(b"data: "):])
    assert ("usage" in body) is include_usage and body["choices"] == choices and expected.endswith(b"}\n\n")
