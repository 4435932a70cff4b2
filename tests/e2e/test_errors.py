"""Every error code of the seed's table, through the OpenAI client's exception classes and on the raw wire."""

from __future__ import annotations

import httpx
import openai
import pytest

from tests.support import MODEL

pytestmark = pytest.mark.e2e
OK = {"model": MODEL, "prompt": "The capital of Canada is", "max_tokens": 2}


def envelope(res: httpx.Response, status: int, code: str, param=None) -> dict:
    assert res.status_code == status, res.text
    assert res.headers["content-type"].startswith("application/json")
    err = res.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["code"] == code and err["param"] == param and err["message"]
    return err


@pytest.mark.parametrize("body, param", [
    ({**OK, "max_tokens": "16"}, "max_tokens"),
    ({**OK, "max_tokens": -1}, "max_tokens"),
    ({**OK, "temperature": 3}, "temperature"),
    ({**OK, "top_p": 1.5}, "top_p"),
    ({**OK, "n": 0}, "n"),
    ({**OK, "n": 129}, "n"),
    ({**OK, "logprobs": 6}, "logprobs"),
    ({**OK, "stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({**OK, "echo": 1}, "echo"),
    ({**OK, "presence_penalty": 2.5}, "presence_penalty"),
    ({**OK, "logit_bias": {"x": 1}}, "logit_bias"),
    ({**OK, "logit_bias": {"5": 200}}, "logit_bias"),
    ({**OK, "seed": 2**64}, "seed"),
    ({**OK, "best_of": 1, "n": 2}, "best_of"),
    ({**OK, "best_of": 3, "stream": True}, "best_of"),
    ({**OK, "stream_options": {"include_usage": True}}, "stream_options"),
    ({**OK, "suffix": "!"}, "suffix"),
    ({**OK, "frobnicate": True}, "frobnicate"),
    ({**OK, "prompt": []}, "prompt"),
    ({**OK, "prompt": [[]]}, "prompt"),
    ({**OK, "prompt": [1, -2]}, "prompt"),
    ({**OK, "prompt": [10**9]}, "prompt"),
    ({**OK, "prompt": 42}, "prompt"),
    ({**OK, "prompt": "x " * 600}, "prompt"),
    ({**OK, "max_tokens": 600}, "max_tokens"),
    ({"prompt": "hi"}, "model"),
    ({"model": MODEL}, "prompt"),
    ({**OK, "top_k": "1"}, "top_k"),
    # Accepted by the fields' types but refused by vLLM's SamplingParams (or its engine's intake): 400, never 502.
    ({**OK, "top_p": 0}, "top_p"),
    ({**OK, "stop": ""}, "stop"),
    ({**OK, "stop": ["x", ""]}, "stop"),
    ({**OK, "bad_words": [""]}, "bad_words"),
    ({**OK, "logit_bias": {"\u00b2": 1}}, "logit_bias"),
    ({**OK, "logit_bias": {"1" * 5000: 1}}, "logit_bias"),
    ({**OK, "top_k": 10**30, "temperature": 1}, "top_k"),
    ({**OK, "priority": 2**70}, "priority"),
    ({**OK, "max_tokens": None, "min_tokens": 100}, "min_tokens"),
])
def test_invalid_request_names_the_param(http, body, param):
    envelope(http.post("/v1/completions", json=body), 400, "invalid_request", param)


@pytest.mark.parametrize("extra, param", [
    ({"min_tokens": 100000}, "min_tokens"),  # above what the context leaves, with no max_tokens set
    ({"stop": [""]}, "stop"),
    ({"top_p": 0}, "top_p"),
])
def test_invalid_chat_request_names_the_param(http, extra, param):
    body = {"model": MODEL, "messages": [{"role": "user", "content": "What is the capital of Canada?"}], **extra}
    envelope(http.post("/v1/chat/completions", json=body), 400, "invalid_request", param)


@pytest.mark.parametrize("raw", [b"{", b"[1, 2]", b"null", b"\xff\xfe", b"[" * 100000])
def test_malformed_bodies_are_400(http, raw):
    res = http.post("/v1/completions", content=raw, headers={"content-type": "application/json"})
    envelope(res, 400, "invalid_request")


def test_oversized_body_is_400(http):
    res = http.post("/v1/completions", json={**OK, "prompt": "x" * 3_000_000})
    err = envelope(res, 400, "invalid_request")
    assert "larger than" in err["message"]


def test_unknown_model_through_client(client):
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model="gpt-oss-120b", prompt="hi", max_tokens=1)
    assert info.value.code == "model_not_found" and info.value.param == "model"
    assert "not deployed on this cluster" in info.value.message
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model="no-such-model", prompt="hi", max_tokens=1)
    assert info.value.code == "model_not_found" and "does not exist" in info.value.message


def test_invalid_request_through_client(client):
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=MODEL, prompt="hi", max_tokens=1, logprobs=9)
    assert info.value.code == "invalid_request" and info.value.param == "logprobs"


@pytest.mark.parametrize("header", [None, "Bearer", "Bearer sk-abc", "Basic qbt_x", "Bearer qbt_unknown"])
def test_bad_keys_are_401(stack, header):
    headers = {"Authorization": header} if header else {}
    res = httpx.post(stack.base_url + "/v1/completions", json=OK, headers=headers)
    assert res.status_code == 401
    assert res.json()["error"]["code"] == "invalid_api_key"


def test_unknown_key_through_client(stack):
    c = openai.OpenAI(base_url=stack.base_url + "/v1", api_key="qbt_nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as info:
        c.completions.create(model=MODEL, prompt="hi", max_tokens=1)
    assert info.value.code == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        c.models.list()


def test_revoked_key_is_401(stack, customer, redis_server):
    from serve_app.money import keyring, keyspace

    c = openai.OpenAI(base_url=stack.base_url + "/v1", api_key=customer.key, max_retries=0)
    c.completions.create(model=MODEL, prompt="hi", max_tokens=1)
    keyring.revoke_key(keyspace.sync_client(redis_server.url), customer.key)
    with pytest.raises(openai.AuthenticationError) as info:
        c.completions.create(model=MODEL, prompt="hi", max_tokens=1)
    assert info.value.code == "invalid_api_key"


def test_no_credit_is_402(stack, make_customer):
    broke = make_customer(credits="0")
    c = openai.OpenAI(base_url=stack.base_url + "/v1", api_key=broke.key, max_retries=0)
    with pytest.raises(openai.APIStatusError) as info:
        c.completions.create(model=MODEL, prompt="hi", max_tokens=4)
    assert info.value.status_code == 402 and info.value.code == "insufficient_funds"
    assert "$0.000000 available" in info.value.message


def test_rate_limit_is_429_with_retry_after(stack, make_customer):
    limited = make_customer(rpm=1)
    c = openai.OpenAI(base_url=stack.base_url + "/v1", api_key=limited.key, max_retries=0)
    first = c.completions.with_raw_response.create(model=MODEL, prompt="hi", max_tokens=1)
    assert first.headers["x-ratelimit-limit-requests"] == "1"
    assert first.headers["x-ratelimit-remaining-requests"] == "0"
    with pytest.raises(openai.RateLimitError) as info:
        c.completions.create(model=MODEL, prompt="hi", max_tokens=1)
    assert info.value.code == "rate_limit_exceeded"
    assert 1 <= int(info.value.response.headers["retry-after"]) <= 60


def test_unknown_route_and_method(http):
    assert http.get("/v1/nothing").json()["error"]["code"] == "not_found"
    assert http.get("/v1/completions").status_code == 405


def test_every_response_carries_a_request_id(http):
    assert http.post("/v1/completions", json=OK).headers["x-request-id"]
    assert http.post("/v1/completions", json={}).headers["x-request-id"]
    mine = http.post("/v1/completions", json=OK, headers={"x-request-id": "my-req-1"})
    assert mine.headers["x-request-id"] == "my-req-1"
