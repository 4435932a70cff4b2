"""vLLM's extra fields where they are safe (issue #15, item 4), on the request path with the simulated engine:
`return_token_ids`, `stream_options.continuous_usage_stats`, `priority` (only where the engine schedules by it) and
`structured_outputs` (validated here; the engine enforces it, tests/e2e/test_chat.py)."""

from __future__ import annotations

import json

from deployments.sim_tokenizer import sim_tokenizer
from tests.unit.serving.test_chat import chat, post_chat, rendered_prompt_tokens
from tests.unit.serving.test_completions import PROMPT, body, error_of, read_all


async def test_return_token_ids_whole_and_streamed(harness):
    (choice,) = json.loads((await harness.post(body(return_token_ids=True))).body)["choices"]
    assert choice["prompt_token_ids"] == sim_tokenizer().encode(PROMPT) and len(choice["token_ids"]) == 8
    assert sim_tokenizer().decode(choice["token_ids"]) == choice["text"]
    got = await read_all(await harness.post(body(return_token_ids=True, stream=True)))
    ids = [t for chunk in got[:-1] for c in chunk["choices"] for t in c["token_ids"]]
    assert ids == choice["token_ids"] and "prompt_token_ids" in got[0]["choices"][0]
    assert "prompt_token_ids" not in got[1]["choices"][0]
    (message,) = json.loads((await post_chat(harness, chat(return_token_ids=True))).body)["choices"]
    assert len(message["token_ids"]) == 8 and len(message["prompt_token_ids"]) == rendered_prompt_tokens()


async def test_continuous_usage_stats_put_the_usage_so_far_in_every_chunk(harness):
    options = {"include_usage": True, "continuous_usage_stats": True}
    got = await read_all(await harness.post(body(stream=True, stream_options=options)))
    counts = [chunk["usage"]["completion_tokens"] for chunk in got[:-2]]
    assert counts == sorted(counts) and counts[-1] == 8 and len(counts) == 8
    assert all(chunk["usage"]["prompt_tokens"] == len(PROMPT) for chunk in got[:-1])
    assert "cost" in got[-2]["usage"] and got[-2]["choices"] == []  # the final chunk: settled, with its cost
    plain = await read_all(await harness.post(body(stream=True, stream_options={"include_usage": True})))
    assert all(chunk["usage"] is None for chunk in plain[:-2])
    harness.billing.guard = "output"  # the output gate releases in windows of 8: 5 tokens go at the stream's end
    gated = await read_all(await harness.post(body(stream=True, stream_options=options, max_tokens=5)))
    assert len(gated) >= 3 and all(chunk["usage"] is not None for chunk in gated[:-1])
    assert gated[-3]["usage"]["completion_tokens"] == 5 and gated[-3]["choices"]


async def test_priority_only_where_the_engine_schedules_by_it_and_structured_outputs_checked(harness):
    res = await harness.post(body(priority=-1))
    assert res.status_code == 400 and error_of(res)["param"] == "priority"
    for bad in ({"regex": "a+", "choice": ["a"]}, {}, {"json": 3}):
        res = await harness.post(body(structured_outputs=bad))
        assert res.status_code == 400 and error_of(res)["param"].startswith("structured_outputs"), bad
    assert (await harness.post(body(structured_outputs={"choice": [" Ottawa.", " Paris."]}))).status_code == 200
    res = await post_chat(harness, chat(response_format={"type": "json_object"}, structured_outputs={"regex": "x"}))
    assert res.status_code == 400 and error_of(res)["param"] == "structured_outputs"


async def test_prompt_logprobs_come_once_per_choice_and_never_unjudged(harness):
    (choice,) = json.loads((await harness.post(body(prompt_logprobs=1))).body)["choices"]
    prompt = sim_tokenizer().encode(PROMPT)
    assert len(choice["prompt_logprobs"]) == len(prompt) and choice["prompt_logprobs"][0] is None
    assert all(str(t) in p and p[str(t)]["decoded_token"] for t, p in zip(prompt[1:], choice["prompt_logprobs"][1:]))
    got = await read_all(await harness.post(body(prompt_logprobs=1, stream=True)))
    assert "prompt_logprobs" in got[0]["choices"][0] and all("prompt_logprobs" not in c for chunk in got[1:-1]
                                                             for c in chunk["choices"])
    harness.billing.guard = "output"
    res = await harness.post(body(prompt_logprobs=1))
    assert res.status_code == 400 and error_of(res)["param"] == "prompt_logprobs"


async def test_a_chat_streams_every_chunk_has_the_usage_with_continuous_stats(harness):
    options = {"include_usage": True, "continuous_usage_stats": True}
    got = await read_all(await post_chat(harness, chat(stream=True, stream_options=options)))
    assert got[0]["usage"]["completion_tokens"] == 0 and got[0]["choices"][0]["delta"]["role"] == "assistant"
    assert all(chunk["usage"] is not None for chunk in got[:-1])
