"""What vLLM's own SamplingParams refuses reaches the client as 400 `invalid_request`, not as the model's 502:
`deployments/engine.py` maps vLLM's client errors (they are not ValueErrors) to InvalidSampling. Real vLLM, no
engine started; the ingress's fields already refuse these, so this is the engine's own line of defence."""

from __future__ import annotations

import pytest

from deployments.engine import Engine
from deployments.wire import GenerationRequest, InvalidSampling

pytestmark = pytest.mark.e2e


@pytest.mark.parametrize("sampling", [
    {"top_p": 0.0},
    {"stop": [""]},
    {"bad_words": [""]},
    {"min_tokens": 100},
    {"logit_bias": {"\u00b2": 1.0}},
    {"structured_outputs": {"json": "{}", "regex": "a"}},
])
def test_vllms_refusals_are_invalid_sampling(sampling):
    req = GenerationRequest("cmpl-x", [[1, 2]], ["hi"], sampling, max_tokens=16)
    with pytest.raises(InvalidSampling):
        Engine("unused", "m", {})._params(req, 1, stream=False)


def test_valid_sampling_builds_params():
    req = GenerationRequest("cmpl-x", [[1, 2]], ["hi"], {"top_p": 0.5, "stop": ["\n"], "logit_bias": {"7": -1.0}},
                            max_tokens=16)
    params = Engine("unused", "m", {})._params(req, 1, stream=False)
    assert params.top_p == 0.5 and params.stop == ["\n"] and params.logit_bias == {7: -1.0}


@pytest.mark.parametrize("reason", ["error", "abort"])
def test_a_sequence_the_engine_failed_is_an_engine_failure_not_a_stop(reason):
    """vLLM ends a sequence with `error` when, say, the grammar rejects the sampled token: upstream_error (in-band
    for a stream, which pays what it received), never a normal "stop" charged in full."""
    from types import SimpleNamespace

    from deployments.choices import ChoiceCursor
    from deployments.wire import EngineFailure, Usage

    req = GenerationRequest("cmpl-x", [[1, 2]], ["hi"], {}, max_tokens=16)
    out = SimpleNamespace(token_ids=[5], text="x", finish_reason=reason, logprobs=None)
    with pytest.raises(EngineFailure, match=reason):
        Engine("unused", "m", {})._fragment(req, ChoiceCursor(index=0), out, 0, None, Usage(2))
    done = SimpleNamespace(token_ids=[5], text="x", finish_reason="length", logprobs=None)
    assert Engine("unused", "m", {})._fragment(req, ChoiceCursor(index=0), done, 0, None, Usage(2))[
        "finish_reason"] == "length"
