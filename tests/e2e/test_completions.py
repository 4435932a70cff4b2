"""The completions contract through the official OpenAI client, against Ray Serve + vLLM + Redis."""

from __future__ import annotations

import json

import openai
import pytest

from tests.support import MODEL

pytestmark = pytest.mark.e2e
CANADA = "The capital of Canada is"
FRANCE = "The capital of France is"


def test_seed_example_answers_ottawa(client):
    res = client.completions.create(model=MODEL, prompt=CANADA, max_tokens=16, temperature=0)
    assert res.id.startswith("cmpl-")
    assert res.object == "text_completion"
    assert res.model == MODEL
    assert res.created > 1_700_000_000
    assert res.choices[0].text.startswith(" Ottawa")
    assert res.choices[0].index == 0
    assert res.choices[0].finish_reason == "stop"
    assert res.usage.prompt_tokens == 6
    assert res.usage.total_tokens == res.usage.prompt_tokens + res.usage.completion_tokens


def test_stream_with_usage_matches_non_stream(client):
    whole = client.completions.create(model=MODEL, prompt=CANADA, max_tokens=12, temperature=0)
    chunks = list(client.completions.create(model=MODEL, prompt=CANADA, max_tokens=12, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == whole.choices[0].text
    assert all(c.object == "text_completion" and c.id == chunks[0].id for c in chunks)
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert all(c.usage is None for c in chunks[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens == 6


def test_stream_without_usage_has_no_usage_chunk(client):
    chunks = list(client.completions.create(model=MODEL, prompt=CANADA, max_tokens=4, stream=True))
    assert all(c.choices for c in chunks)


def test_multiple_prompts_with_n_index_prompt_major(client):
    res = client.completions.create(model=MODEL, prompt=[CANADA, FRANCE], n=2, max_tokens=4, temperature=0)
    assert [c.index for c in res.choices] == [0, 1, 2, 3]
    assert all(c.text.startswith(" Ottawa") for c in res.choices[:2])
    assert all(c.text.startswith(" Paris") for c in res.choices[2:])
    assert res.usage.prompt_tokens == 12


def test_multiple_prompts_streamed(client):
    texts: dict[int, str] = {}
    for chunk in client.completions.create(model=MODEL, prompt=[CANADA, FRANCE], n=2, max_tokens=4,
                                           temperature=0, stream=True):
        for c in chunk.choices:
            texts[c.index] = texts.get(c.index, "") + c.text
    assert sorted(texts) == [0, 1, 2, 3]
    assert texts[0].startswith(" Ottawa") and texts[3].startswith(" Paris")


def test_token_id_prompts(client, tokenizer):
    ids = tokenizer.encode(CANADA)
    one = client.completions.create(model=MODEL, prompt=ids, max_tokens=4, temperature=0)
    assert one.choices[0].text.startswith(" Ottawa")
    assert one.usage.prompt_tokens == len(ids)
    many = client.completions.create(model=MODEL, prompt=[ids, tokenizer.encode(FRANCE)], max_tokens=4,
                                     temperature=0)
    assert many.choices[1].text.startswith(" Paris")


def test_echo_returns_prompt_first(client):
    res = client.completions.create(model=MODEL, prompt=CANADA, max_tokens=3, temperature=0, echo=True)
    assert res.choices[0].text.startswith(CANADA + " Ottawa")


def test_echo_with_max_tokens_zero_scores_the_prompt(client):
    res = client.completions.create(model=MODEL, prompt=CANADA, max_tokens=0, echo=True, logprobs=1)
    lp = res.choices[0].logprobs
    assert res.choices[0].text == CANADA
    assert lp.token_logprobs[0] is None and all(v <= 0 for v in lp.token_logprobs[1:])
    assert res.usage.completion_tokens == 0


def test_logprobs_are_aligned(client):
    res = client.completions.create(model=MODEL, prompt=CANADA, max_tokens=5, temperature=0, logprobs=3)
    lp = res.choices[0].logprobs
    n = len(lp.tokens)
    assert n == res.usage.completion_tokens
    assert len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == n
    assert all(1 <= len(top) <= 4 for top in lp.top_logprobs)
    assert lp.text_offset == sorted(lp.text_offset) and lp.text_offset[0] == 0
    assert lp.tokens[0] == " Ottawa" and lp.token_logprobs[0] > -0.5


def test_logprobs_streamed_offsets_continue(client):
    offsets, tokens = [], []
    for chunk in client.completions.create(model=MODEL, prompt=CANADA, max_tokens=5, temperature=0, logprobs=1,
                                           stream=True):
        offsets += chunk.choices[0].logprobs.text_offset
        tokens += chunk.choices[0].logprobs.tokens
    assert offsets[0] == 0 and offsets[1] == len(tokens[0])


def test_stop_sequence_is_not_returned(client):
    res = client.completions.create(model=MODEL, prompt=CANADA, max_tokens=8, temperature=0, stop=["."])
    assert res.choices[0].text == " Ottawa"
    assert res.choices[0].finish_reason == "stop"


def test_max_tokens_gives_length(client):
    res = client.completions.create(model=MODEL, prompt=CANADA, max_tokens=1, temperature=0)
    assert res.choices[0].finish_reason == "length"
    assert res.usage.completion_tokens == 1


def test_seed_makes_sampling_repeatable(client):
    kw = dict(model=MODEL, prompt="Once upon a time", max_tokens=12, temperature=1.5, seed=1234)
    assert client.completions.create(**kw).choices[0].text == client.completions.create(**kw).choices[0].text


def test_best_of_returns_n_best(client):
    res = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=6, temperature=1.0,
                                    best_of=4, n=2, logprobs=0)
    assert [c.index for c in res.choices] == [0, 1]
    means = [sum(c.logprobs.token_logprobs) / len(c.logprobs.token_logprobs) for c in res.choices]
    assert means[0] >= means[1] - 1e-6
    assert res.usage.completion_tokens >= sum(len(c.logprobs.tokens) for c in res.choices)


def test_passthrough_sampling_parameters(client):
    res = client.completions.create(model=MODEL, prompt=CANADA, max_tokens=10, temperature=0,
                                    extra_body={"ignore_eos": True, "top_k": 1, "min_p": 0.0,
                                                "repetition_penalty": 1.0})
    assert res.usage.completion_tokens == 10
    assert res.choices[0].finish_reason == "length"


def test_logit_bias_steers_away(client, tokenizer):
    ottawa = tokenizer.encode(" Ottawa", add_special_tokens=False)[0]
    res = client.completions.create(model=MODEL, prompt=CANADA, max_tokens=2, temperature=0,
                                    logit_bias={str(ottawa): -100})
    assert not res.choices[0].text.startswith(" Ottawa")


def test_penalties_and_user_are_accepted(client):
    res = client.completions.create(model=MODEL, prompt=CANADA, max_tokens=3, presence_penalty=0.5,
                                    frequency_penalty=0.5, top_p=0.9, user="end-user-7",
                                    extra_body={"ignore_eos": True})
    assert res.choices[0].finish_reason == "length" and res.usage.completion_tokens == 3
    with pytest.raises(openai.BadRequestError) as err:  # the fields are validated, not ignored
        client.completions.create(model=MODEL, prompt=CANADA, max_tokens=3, presence_penalty=2.5)
    assert err.value.body["param"] == "presence_penalty"


def test_models_lists_the_dev_model(client):
    ids = [m.id for m in client.models.list().data]
    assert MODEL in ids


def test_health_is_ok(stack):
    import httpx

    res = httpx.get(stack.base_url + "/health")
    assert res.status_code == 200
    assert res.json()["components"][MODEL] == "ok"


def test_stream_wire_format(http):
    with http.stream("POST", "/v1/completions", json={"model": MODEL, "prompt": CANADA, "max_tokens": 3,
                                                       "stream": True, "stream_options": {"include_usage": True}}) as s:
        assert s.status_code == 200
        assert s.headers["content-type"].startswith("text/event-stream")
        events = [line for line in s.iter_lines() if line]
    assert events[-1] == "data: [DONE]"
    assert all(e.startswith("data: ") for e in events)
    last = json.loads(events[-2][6:])
    assert last["choices"] == [] and last["usage"]["prompt_tokens"] == 6
