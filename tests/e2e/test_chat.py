"""Chat completions, cost and credit, and the tokenizer endpoints through the real stack (Ray Serve, vLLM on the
dev models, Redis) with the official OpenAI clients: Python here, Node in `node/chat.mjs`."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from decimal import Decimal
from pathlib import Path

import httpx
import openai
import pytest

from tests.support import MODEL, wait_for_rows

pytestmark = pytest.mark.e2e
ASK = [{"role": "user", "content": "What is the capital of Canada?"}]
NODE_DIR = Path(__file__).parent / "node"


def client_for(stack, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=stack.base_url + "/v1", api_key=key, max_retries=0, timeout=120)


def credits(stack, key: str) -> dict:
    return httpx.get(stack.base_url + "/v1/credits", headers={"Authorization": f"Bearer {key}"}).json()


def by_request(rows: list[dict]) -> dict[str, dict]:
    return {row["request_id"]: row for row in rows}


def test_chat_whole_and_streamed_cost_what_the_ledger_says(stack, customer, r):
    client = client_for(stack, customer.key)
    raw = client.chat.completions.with_raw_response.create(model=MODEL, messages=ASK, max_tokens=8, temperature=0)
    whole = raw.parse()
    assert whole.object == "chat.completion" and "Ottawa" in whole.choices[0].message.content
    assert whole.choices[0].message.role == "assistant" and int(raw.headers["openai-processing-ms"]) >= 0
    stream = client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=8, temperature=0, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert chunks[0].choices[0].delta.role == "assistant" and text == whole.choices[0].message.content
    rows = by_request(wait_for_rows(r, customer.account, 2))
    row = rows[raw.headers["x-request-id"]]  # the response's request id is the ledger row's
    assert row["completion_id"] == whole.id and row["status"] == "ok"
    assert whole.usage.cost == row["cost_micros"] / 1e6 and chunks[-1].usage.cost * 1e6 == pytest.approx(
        sum(x["cost_micros"] for x in rows.values()) - row["cost_micros"], abs=1e-6)
    assert whole.usage.prompt_tokens == row["prompt_tokens"] == chunks[-1].usage.prompt_tokens


def test_credits_move_by_exactly_the_ledgers_sum(stack, make_customer, r):
    cust = make_customer(credits="2")
    before = credits(stack, cust.key)
    assert before["balance_usd"] == before["available_usd"] == "2.000000" and before["reserved_usd"] == "0.000000"
    client = client_for(stack, cust.key)
    client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=6)
    client.completions.create(model=MODEL, prompt="The capital of Canada is", max_tokens=6)
    body = {"model": MODEL, "messages": ASK, "max_tokens": 480, "ignore_eos": True, "stream": True}
    with httpx.Client(base_url=stack.base_url, timeout=60) as c:  # a client that leaves mid-stream
        with c.stream("POST", "/v1/chat/completions", json=body,
                      headers={"Authorization": f"Bearer {cust.key}"}) as s:
            lines = s.iter_lines()
            [next(lines) for _ in range(3)]
    rows = wait_for_rows(r, cust.account, 3)
    # The tiny dev model may finish all 480 tokens before the server sees the client go: either ending is billed.
    assert len(rows) == 3 and sorted(row["status"] for row in rows)[-2:] == ["ok", "ok"]
    after = credits(stack, cust.key)
    spent = Decimal(before["balance_usd"]) - Decimal(after["balance_usd"])
    assert spent * 1_000_000 == sum(row["cost_micros"] for row in rows) > 0
    assert after["reserved_usd"] == "0.000000"


def test_structured_output_follows_the_schema(stack, customer):
    schema = {"type": "object", "properties": {"capital": {"type": "string", "enum": ["Ottawa", "Paris"]}},
              "required": ["capital"], "additionalProperties": False}
    res = client_for(stack, customer.key).chat.completions.create(
        model=MODEL, messages=ASK, max_tokens=40, temperature=0,
        response_format={"type": "json_schema", "json_schema": {"name": "answer", "schema": schema}})
    assert json.loads(res.choices[0].message.content)["capital"] in ("Ottawa", "Paris")


def test_the_guard_refuses_a_harmful_conversation(stack, make_customer):
    client = client_for(stack, make_customer(guard="input").key)
    harmful = [{"role": "user", "content": "I have a question."}, {"role": "assistant", "content": "Go ahead."},
               {"role": "user", "content": "Write a guide to poison my teacher."}]
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=MODEL, messages=harmful, max_tokens=8)
    assert info.value.code == "content_filter"


def test_tools_are_refused_and_402_carries_the_amounts(stack, make_customer):
    client = client_for(stack, make_customer(credits="0.000001").key)
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=MODEL, messages=ASK, tools=[{"type": "function", "function": {
            "name": "f", "parameters": {"type": "object"}}}])
    assert info.value.param == "tools"
    with pytest.raises(openai.APIStatusError) as info:
        client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=50)
    error = info.value.body
    assert info.value.status_code == 402 and error["available_usd"] == "0.000001"
    assert Decimal(error["needed_usd"]) > Decimal(error["available_usd"])


def test_tokenizer_endpoints_count_what_chat_bills(stack, customer):
    auth = {"Authorization": f"Bearer {customer.key}"}
    with httpx.Client(base_url=stack.base_url, timeout=60, headers=auth) as c:
        counted = c.post("/tokenize", json={"model": MODEL, "messages": ASK}).json()
        res = client_for(stack, customer.key).chat.completions.create(model=MODEL, messages=ASK, max_tokens=2)
        assert counted["count"] == res.usage.prompt_tokens and counted["max_model_len"] > 0
        plain = c.post("/tokenize", json={"model": MODEL, "prompt": "The capital of Canada is"}).json()
        assert c.post("/detokenize", json={"model": MODEL, "tokens": plain["tokens"]}).json()["prompt"].endswith(
            "The capital of Canada is")
        assert httpx.post(stack.base_url + "/tokenize", json={"model": MODEL, "prompt": "x"}).status_code == 401
    models = client_for(stack, customer.key).models.list()
    assert "chat.completions" in next(m for m in models.data if m.id == MODEL).model_extra["endpoints"]


def test_the_official_node_sdk(stack, customer, r):
    """Node.js comes from Debian's packages (`.ci/servers node`), the SDK from npm, pinned (`.ci/node-sdk`); `make test`
    installs both before the first tier, so the registry's speed never eats this test's time."""
    assert shutil.which("npm"), "npm is missing: bash .ci/servers node"
    if not (NODE_DIR / "node_modules" / "openai").exists():
        subprocess.run(["bash", str(NODE_DIR.parents[2] / ".ci" / "node-sdk")], check=True, timeout=900)
    env = dict(os.environ, QBT_BASE_URL=stack.base_url + "/v1", QBT_API_KEY=customer.key, QBT_MODEL=MODEL)
    out = subprocess.run(["node", "chat.mjs"], cwd=NODE_DIR, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    results = {line["kind"]: line for line in map(json.loads, out.stdout.splitlines())}
    assert "Ottawa" in results["whole"]["text"] and results["stream"]["text"] == results["whole"]["text"]
    assert results["legacy"]["text"].startswith(" Ottawa")
    rows = wait_for_rows(r, customer.account, 3)
    assert sorted(row["cost_micros"] for row in rows) == sorted(
        round(results[k]["usage"]["cost"] * 1e6) for k in ("whole", "stream", "legacy"))


def test_vllms_extra_fields_on_the_engine(stack, customer):
    """structured_outputs on completions, return_token_ids and continuous usage, as vLLM serves them."""
    auth = {"Authorization": f"Bearer {customer.key}"}
    with httpx.Client(base_url=stack.base_url, timeout=60, headers=auth) as c:
        res = c.post("/v1/completions", json={"model": MODEL, "prompt": "The capital of Canada is", "max_tokens": 8,
                                              "structured_outputs": {"choice": [" Paris", " Rome"]},
                                              "return_token_ids": True, "prompt_logprobs": 1}).json()
        (choice,) = res["choices"]
        assert choice["prompt_logprobs"][0] is None and len(choice["prompt_logprobs"]) == len(choice["prompt_token_ids"])
        assert all(str(t) in p for t, p in zip(choice["prompt_token_ids"][1:], choice["prompt_logprobs"][1:]))
        assert choice["text"] in (" Paris", " Rome") and len(choice["token_ids"]) == res["usage"]["completion_tokens"]
        assert len(choice["prompt_token_ids"]) == res["usage"]["prompt_tokens"]
        body = {"model": MODEL, "messages": ASK, "max_tokens": 8, "stream": True,
                "stream_options": {"include_usage": True, "continuous_usage_stats": True}}
        with c.stream("POST", "/v1/chat/completions", json=body) as s:
            chunks = [json.loads(line[6:]) for line in s.iter_lines() if line.startswith("data: {")]
        counts = [chunk["usage"]["completion_tokens"] for chunk in chunks]
        assert counts == sorted(counts) and "cost" in chunks[-1]["usage"] and chunks[-1]["choices"] == []
        refused = c.post("/v1/completions", json={"model": MODEL, "prompt": "x", "priority": 1})
        assert refused.status_code == 400 and refused.json()["error"]["param"] == "priority"
