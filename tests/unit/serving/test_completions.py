"""The request path on the simulated engine, without Ray: what the client gets and what the path settles, for
each way a request ends."""

from __future__ import annotations

import asyncio
import json

from starlette.responses import StreamingResponse

from serve_app.money.status import Status
from tests.inprocess import KEY, LEAKY, LLM, events, request_scope

PROMPT = "The capital of Canada is"


def body(**fields) -> dict:
    return {"model": LLM, "prompt": PROMPT, "max_tokens": 8, **fields}


def error_of(response) -> dict:
    return json.loads(response.body)["error"]


async def read_all(response) -> list:
    assert isinstance(response, StreamingResponse)
    return events([chunk async for chunk in response.body_iterator])


async def test_a_completion_is_served_and_settled_for_what_it_produced(harness):
    res = await harness.post(body())
    assert res.status_code == 200
    out = json.loads(res.body)
    assert out["object"] == "text_completion" and out["model"] == LLM and out["created"] == 1_700_000_000
    assert out["choices"] == [{"text": " Ottawa.", "index": 0, "logprobs": None, "finish_reason": "length"}]
    assert out["usage"] == {"prompt_tokens": len(PROMPT), "completion_tokens": 8, "total_tokens": len(PROMPT) + 8,
                            "cost": (len(PROMPT) + 3 * 8) / 1e6}  # what the settlement charged
    completion_id, usage, status = await harness.billing.one_settlement()
    assert completion_id == out["id"] and status is Status.OK
    assert (usage.prompt_tokens, usage.completion_tokens) == (len(PROMPT), 8)


async def test_a_bad_key_is_refused_before_any_work(harness):
    for key in (None, "sk-not-ours"):
        res = await harness.post(body(), key=key)
        assert res.status_code == 401 and error_of(res)["code"] == "invalid_api_key"
    res = await harness.post(body(), key="qbt_" + "x" * 40)
    assert res.status_code == 401
    assert harness.billing.admitted == [] and harness.billing.settled == []


async def test_refused_admission_is_answered_and_nothing_runs(harness):
    from serve_app.api.errors import ApiError, Code

    harness.billing.refuse = ApiError(Code.INSUFFICIENT_FUNDS, "Insufficient funds")
    res = await harness.post(body())
    assert res.status_code == 402 and error_of(res)["code"] == "insufficient_funds"
    assert harness.billing.settled == [] and not harness.engines[LLM].clock.running


async def test_invalid_bodies_are_400_with_the_field(harness):
    res = await harness.post(b"{not json")
    assert res.status_code == 400 and error_of(res)["code"] == "invalid_request"
    res = await harness.post(body(max_tokens="8"))
    assert res.status_code == 400 and error_of(res)["param"] == "max_tokens"
    res = await harness.post(body(model="nope"))
    assert res.status_code == 400 and error_of(res)["code"] == "model_not_found"


async def test_streamed_fragments_add_up_and_end_with_usage_then_done(harness):
    res = await harness.post(body(stream=True, n=2, stream_options={"include_usage": True}))
    assert res.status_code == 200 and res.media_type == "text/event-stream"
    got = await read_all(res)
    assert got[-1] == "[DONE]"
    usage = got[-2]["usage"]
    assert got[-2]["choices"] == [] and usage["completion_tokens"] == 16
    chunks = got[:-2]
    assert all(len({c["index"] for c in chunk["choices"]}) == len(chunk["choices"]) for chunk in chunks)
    for index in (0, 1):
        text = "".join(c["text"] for chunk in chunks for c in chunk["choices"] if c["index"] == index)
        assert text == " Ottawa."
    _, settled_usage, status = await harness.billing.one_settlement()
    assert status is Status.OK and settled_usage.completion_tokens == 16


async def test_the_input_guard_refuses_a_prompt_and_nothing_is_charged(harness):
    harness.billing.guard = "input"
    for stream in (False, True):
        harness.billing.settled.clear()
        res = await harness.post(body(prompt="How do I build a bomb?", stream=stream))
        assert res.status_code == 400
        error = error_of(res)
        assert error["code"] == "content_filter" and error["guard"]["safety"] == "Unsafe"
        (_, _, status), = harness.billing.settled
        assert status is Status.CONTENT_FILTER and not status.charged
        await asyncio.sleep(0.05)
        assert not harness.engines[LLM].clock.running, "the refused prompt's generation went on"


async def test_the_output_guard_withholds_a_whole_completion(harness):
    harness.billing.guard = "output"
    res = await harness.post(body(model=LEAKY, max_tokens=40))
    assert res.status_code == 200
    (choice,) = json.loads(res.body)["choices"]
    assert choice["text"] == "" and choice["finish_reason"] == "content_filter"


async def test_the_stream_gate_stops_unsafe_output_and_bills_what_was_produced(harness):
    harness.billing.guard = "both"
    res = await harness.post(body(model=LEAKY, max_tokens=200, stream=True))
    got = await read_all(res)
    assert got[-1] == "[DONE]"
    released = "".join(c["text"] for chunk in got[:-1] for c in chunk["choices"])
    assert "bomb" not in released
    assert got[-2]["choices"][-1]["finish_reason"] == "content_filter"
    _, usage, status = await harness.billing.one_settlement()
    assert status is Status.OUTPUT_FILTERED and status.charged and 0 < usage.completion_tokens < 200


async def test_a_client_that_leaves_mid_stream_pays_for_what_was_produced(harness):
    res = await harness.post(body(max_tokens=500, stream=True))
    chunks = res.body_iterator
    first = await anext(chunks)
    assert first.startswith(b"data: ")
    await chunks.aclose()  # the client closed the connection
    _, usage, status = await harness.billing.one_settlement()
    assert status is Status.DISCONNECTED and 1 <= usage.completion_tokens < 500
    await asyncio.sleep(0.05)
    assert not harness.engines[LLM].clock.running, "the engine kept generating for a client that left"


async def test_a_cancelled_request_is_settled_as_disconnected(harness):
    """Starlette cancels the response task when the client goes; the settlement must still happen."""
    res = await harness.post(body(max_tokens=500, stream=True))

    async def consume():
        async for _ in res.body_iterator:
            pass

    task = asyncio.create_task(consume())
    await asyncio.sleep(0.05)
    task.cancel()
    _, usage, status = await harness.billing.one_settlement()
    assert status is Status.DISCONNECTED and usage.completion_tokens >= 1


async def test_a_replica_dying_mid_stream_is_an_in_band_error_and_charges_what_was_delivered(harness):
    res = await harness.post(body(prompt="[[sim fault=die after=5]] Once upon a time", max_tokens=50, stream=True))
    assert res.status_code == 200
    got = await read_all(res)
    assert got[-1] == "[DONE]" and got[-2]["error"]["code"] == "upstream_error"
    delivered = sum(len(c["text"]) for chunk in got[:-2] for c in chunk["choices"])
    _, usage, status = await harness.billing.one_settlement()
    assert status is Status.INTERRUPTED and status.charged and usage.completion_tokens == delivered == 5


async def test_failures_before_the_first_byte_are_plain_http_errors(harness):
    for directive, code, http in (("[[sim fault=hang]]", "upstream_error", 502),
                                  ("[[sim fault=raise]]", "upstream_error", 502),
                                  ("[[sim fault=sometimes]]", "invalid_request", 400)):
        for stream in (True, False):
            harness.billing.settled.clear()
            if directive == "[[sim fault=hang]]" and not stream:
                continue  # a non-streaming hang is bounded by max_request_s (below)
            res = await harness.post(body(prompt=directive + " hello", stream=stream))
            assert res.status_code == http and error_of(res)["code"] == code, (directive, stream, res.body)
            (_, _, status), = harness.billing.settled
            assert status.value == code


async def test_the_http_app_routes_completions_models_and_health(harness):
    """Through Starlette's routing, as Serve's HTTP server drives the app."""
    from starlette.testclient import TestClient

    with TestClient(harness.gateway.app()) as http:
        auth = {"authorization": f"Bearer {KEY}"}
        res = http.post("/v1/completions", json=body(), headers=auth)
        assert res.status_code == 200 and res.json()["choices"][0]["text"] == " Ottawa."
        with http.stream("POST", "/v1/completions", json=body(stream=True), headers=auth) as s:
            lines = [line for line in s.iter_lines() if line]
        assert s.status_code == 200 and lines[-1] == "data: [DONE]" and len(lines) == 9  # 8 tokens, then [DONE]
        assert http.get("/v1/completions").status_code == 405
        models = http.get("/v1/models", headers={"authorization": f"Bearer {KEY}"})
        assert models.status_code == 200 and {m["id"] for m in models.json()["data"]} >= {LLM, LEAKY}
        assert http.get("/v1/models").status_code == 401
        health = http.get("/health")
        assert health.status_code == 200 and health.json()["components"]["redis"] == "ok"
        assert http.get("/nowhere").json()["error"]["code"] == "not_found"


async def test_a_key_with_an_unreadable_guard_mode_gets_the_default_policy(harness):
    harness.billing.guard = "both, open"  # stored before modifiers were checked
    res = await harness.post(body(prompt="How do I build a bomb?"))
    assert res.status_code == 400 and error_of(res)["code"] == "content_filter"
    (_, _, status), = harness.billing.settled
    assert status is Status.CONTENT_FILTER


async def test_the_final_settlement_survives_the_request_being_cancelled(harness):
    entered, release = asyncio.Event(), asyncio.Event()
    settle = harness.billing.settle

    async def slow_settle(*args):
        entered.set()
        await release.wait()
        return await settle(*args)

    harness.billing.settle = slow_settle
    request = asyncio.create_task(harness.post(body()))
    await asyncio.wait_for(entered.wait(), 5)  # served; the path now waits on the settlement
    request.cancel()
    release.set()
    _, usage, status = await harness.billing.one_settlement()
    assert status is Status.OK and usage.completion_tokens == 8


async def test_a_client_that_stops_reading_is_cut_off_at_the_request_bound_and_pays_what_was_produced(harness):
    harness.gateway.completions.max_request_s = 0.3
    sent = await asyncio.wait_for(harness.exchange(body(max_tokens=2000, stream=True), reads=2), 5)
    assert sent[0]["status"] == 200 and sum(m["type"] == "http.response.body" for m in sent) == 2
    _, usage, status = await harness.billing.one_settlement()
    assert status is Status.TIMED_OUT and status.charged and 1 <= usage.completion_tokens < 2000
    await asyncio.sleep(0.05)
    assert not harness.engines[LLM].clock.running, "the engine kept generating for a request cut off"


async def test_a_request_past_the_bound_before_answering_is_a_502_and_settles(harness):
    harness.gateway.completions.max_request_s = 0.3
    sent = await asyncio.wait_for(harness.exchange(body(prompt="[[sim fault=hang]] hello")), 5)
    assert sent[0]["status"] == 502
    assert json.loads(sent[1]["body"])["error"]["code"] == "upstream_error"
    _, usage, status = await harness.billing.one_settlement()
    assert status is Status.UPSTREAM_ERROR and not status.charged  # nothing reached the client: nothing to pay


async def test_a_stream_cut_off_before_its_events_started_still_settles(harness):
    """The bound (or a disconnect) can land while the response start is being sent: the events never run."""
    harness.gateway.completions.max_request_s = 0.3
    scope_sent = []

    async def stuck_send(message):
        scope_sent.append(message)
        await asyncio.Event().wait()  # the response start never goes out

    scope, receive = request_scope(body(max_tokens=50, stream=True), KEY, None)
    await asyncio.wait_for(harness.gateway.completions(scope, receive, stuck_send), 5)
    assert scope_sent and scope_sent[0]["type"] == "http.response.start"
    _, usage, status = await harness.billing.one_settlement()
    assert status is Status.UPSTREAM_ERROR and usage.completion_tokens >= 1
    await asyncio.sleep(0.05)
    assert not harness.engines[LLM].clock.running, "the engine kept generating for a stream never sent"


async def test_a_whole_exchange_inside_the_bound_is_untouched(harness):
    sent = await harness.exchange(body(stream=True))
    assert sent[0]["status"] == 200 and sent[-2]["body"] == b"data: [DONE]\n\n"
    _, usage, status = await harness.billing.one_settlement()
    assert status is Status.OK and usage.completion_tokens == 8


async def test_a_reading_client_past_the_bound_gets_an_in_band_error_and_done(harness):
    harness.gateway.completions.max_request_s = 0.3
    sent = await asyncio.wait_for(harness.exchange(body(max_tokens=2000, stream=True)), 5)
    assert sent[0]["status"] == 200 and sent[-1]["more_body"] is False
    got = events([m["body"] for m in sent[1:]])
    assert got[-1] == "[DONE]" and got[-2]["error"]["code"] == "upstream_error"
    assert "0.3 s" in got[-2]["error"]["message"]
    _, usage, status = await harness.billing.one_settlement()
    assert status is Status.TIMED_OUT and 1 <= usage.completion_tokens < 2000


async def test_logprobs_are_refused_where_the_output_is_moderated(harness):
    """The guard judges returned text, not the alternatives logprobs (or echoed prompt logprobs) would show."""
    harness.billing.guard = "output"
    for fields in ({"logprobs": 2}, {"logprobs": 0, "echo": True, "max_tokens": 0}):
        harness.billing.settled.clear()
        res = await harness.post(body(**fields))
        assert res.status_code == 400 and error_of(res)["param"] == "logprobs", res.body
        (_, usage, status), = harness.billing.settled
        assert status is Status.INVALID_REQUEST and not status.charged and usage.completion_tokens == 0
    harness.billing.guard = "input"  # only the prompt is judged: logprobs are the model's, as asked
    assert (await harness.post(body(logprobs=2))).status_code == 200


async def test_an_echoed_prompt_is_judged_where_the_output_is_moderated(harness):
    """`echo` with `max_tokens: 0` returns the prompt as output: under output-only moderation it is judged as such,
    never handed back unjudged (whole and streamed)."""
    harness.billing.guard = "output"
    unsafe = body(prompt="Explain how to build a bomb.", echo=True, max_tokens=0)
    (choice,) = json.loads((await harness.post(unsafe)).body)["choices"]
    assert choice["text"] == "" and choice["finish_reason"] == "content_filter"
    got = await read_all(await harness.post({**unsafe, "stream": True}))
    assert "bomb" not in json.dumps(got) and got[-2]["choices"][-1]["finish_reason"] == "content_filter"
    (choice,) = json.loads((await harness.post(body(echo=True, max_tokens=0))).body)["choices"]
    assert choice["text"] == PROMPT  # a harmless prompt is echoed as sent


async def test_an_unknown_key_is_refused_before_its_body_is_read(harness):
    scope, _ = request_scope(body(), "qbt_" + "x" * 40, None)

    async def receive():
        raise AssertionError("the body of an unauthenticated request was read")

    from starlette.requests import Request

    res = await harness.gateway.completions.handle(Request(scope, receive))
    assert res.status_code == 401 and error_of(res)["code"] == "invalid_api_key"


async def test_too_many_sequences_and_a_trickled_body_are_refused(harness):
    res = await harness.post(body(prompt=["a"] * 20, n=4, best_of=20))
    assert res.status_code == 400 and error_of(res)["param"] == "n" and "400 sequences" in error_of(res)["message"]
    assert harness.billing.admitted == []  # refused before anything was reserved
    harness.gateway.completions.body_read_s = 0.2
    scope, _ = request_scope(body(), KEY, None)

    async def trickle():
        await asyncio.sleep(5)
        return {"type": "http.request", "body": b"{", "more_body": True}

    from starlette.requests import Request

    res = await harness.gateway.completions.handle(Request(scope, trickle))
    assert res.status_code == 400 and "did not arrive within 0.2 s" in error_of(res)["message"]


async def test_an_address_that_keeps_sending_unknown_keys_is_throttled_before_the_lookup(harness):
    limit = harness.gateway.config.auth_failure_limit
    for _ in range(limit):
        res = await harness.post(body(), key="qbt_" + "x" * 40)
        assert res.status_code == 401
    res = await harness.post(body(), key="qbt_" + "y" * 40)
    assert res.status_code == 429 and error_of(res)["code"] == "rate_limit_exceeded"
    assert int(res.headers["retry-after"]) >= 1 and harness.billing.admitted == []


async def test_a_first_item_given_up_leaves_no_unretrieved_error():
    """The input guard refusing before the first item: the handle stream is cancelled, and Serve's handle turns
    that into RequestCancelledError in the task waiting for the item; nobody awaits it, and nothing is logged."""
    import gc

    from serve_app.serving.model_stream import abandon, first_item

    class CancelledByServe(Exception):
        pass

    class Stream:
        def __aiter__(self):
            return self

        async def __anext__(self):
            try:
                await asyncio.sleep(60)
            except asyncio.CancelledError:
                raise CancelledByServe("cancelled") from None

    loop = asyncio.get_running_loop()
    reported = []
    loop.set_exception_handler(lambda _, context: reported.append(context))
    try:
        first = asyncio.ensure_future(first_item(Stream(), 3, 5))
        await asyncio.sleep(0)
        abandon(first)
        await asyncio.sleep(0.01)
        assert first.done()  # and the item's own task ended with Serve's error, which nobody awaited
        del first
        gc.collect()
        assert reported == []
    finally:
        loop.set_exception_handler(None)


async def test_health_callers_share_one_round_of_checks_a_second(harness, monkeypatch):
    from serve_app.serving import gateway as gateway_module

    pings = []

    async def ping():
        pings.append(1)
        await asyncio.sleep(0.05)
        return True

    harness.gateway.ping = ping
    answers = await asyncio.gather(*(harness.gateway.health(None) for _ in range(20)))
    assert {a.status_code for a in answers} == {200} and len(pings) == 1
    assert (await harness.gateway.health(None)).status_code == 200 and len(pings) == 1  # still fresh
    monkeypatch.setattr(gateway_module, "HEALTH_FRESH_S", 0.0)
    assert (await harness.gateway.health(None)).status_code == 200 and len(pings) == 2
