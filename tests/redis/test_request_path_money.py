"""The request path with real money: the gateway on simulated models in this process, admission and settlement by
the real scripts on a real Redis. Every ending leaves one ledger row, and balance and ledger agree."""

from __future__ import annotations

import asyncio
import json
import uuid

import pytest

from serve_app.money import accounts, keyring, keyspace
from serve_app.money.billing import Billing
from tests.inprocess import LLM, events, start_harness, stop_harness
from tests.support import lua_cost, wait_for_rows

IN, OUT = 500_000, 1_500_000
PROMPT = "The capital of Canada is"


@pytest.fixture
async def harness(redis_server):
    client = keyspace.async_client(redis_server.url)
    h = await start_harness(Billing.on(client, 0, 0, 900))
    yield h
    stop_harness(h)
    await client.aclose()


@pytest.fixture
def paying(r):
    name = "p-" + uuid.uuid4().hex[:8]
    accounts.create_account(r, name, "1")
    key, _ = keyring.create_key(r, name, guard="off")
    return name, key


def assert_books_balance(r, name: str, rows: list[dict]) -> None:
    acct = r.hgetall(keyspace.account_record(name))
    assert int(acct["reserved"]) == 0
    assert 1_000_000 - int(acct["balance"]) == sum(row["cost_micros"] for row in rows) == int(acct["spent"])


async def test_served_streamed_and_disconnected_requests_balance_to_the_micro_dollar(harness, paying, r):
    name, key = paying
    res = await harness.post({"model": LLM, "prompt": PROMPT, "max_tokens": 8}, key=key)
    assert res.status_code == 200
    streamed = await harness.post({"model": LLM, "prompt": PROMPT, "max_tokens": 8, "stream": True}, key=key)
    assert events([c async for c in streamed.body_iterator])[-1] == "[DONE]"
    left = await harness.post({"model": LLM, "prompt": PROMPT, "max_tokens": 400, "stream": True}, key=key)
    await anext(left.body_iterator)
    await left.body_iterator.aclose()
    rows = await asyncio.to_thread(wait_for_rows, r, name, 3)
    by_status = {row["status"]: row for row in rows}
    assert set(by_status) == {"ok", "disconnected"} and len(rows) == 3
    assert by_status["ok"]["cost_micros"] == lua_cost(r, len(PROMPT), 8, IN, OUT)
    gone = by_status["disconnected"]
    assert 1 <= gone["completion_tokens"] < 400
    assert gone["cost_micros"] == lua_cost(r, len(PROMPT), gone["completion_tokens"], IN, OUT)
    assert_books_balance(r, name, rows)


async def test_a_request_gone_while_admitted_holds_neither_money_nor_its_slot(harness, r):
    """The client goes away after the admission script reserved but before its reply came back: the reservation is
    released at once (disconnected, nothing produced, nothing charged), not held until its deadline, 900 s here."""
    name = "g-" + uuid.uuid4().hex[:8]
    accounts.create_account(r, name, "1")
    key, _ = keyring.create_key(r, name, guard="off", concurrency=1)
    admitter = harness.billing.admitter
    real, reserved = admitter.admit, asyncio.Event()

    async def late_reply(*args, **kwargs):
        admission = await real(*args, **kwargs)
        reserved.set()
        await asyncio.sleep(0.5)
        return admission

    admitter.admit = late_reply
    body = {"model": LLM, "prompt": PROMPT, "max_tokens": 8}
    request = asyncio.ensure_future(harness.post(body, key=key))
    await asyncio.wait_for(reserved.wait(), 10)
    request.cancel()
    with pytest.raises(asyncio.CancelledError):
        await request
    admitter.admit = real
    (row,) = await asyncio.to_thread(wait_for_rows, r, name, 1)
    assert row["status"] == "disconnected" and row["cost_micros"] == 0 and row["completion_tokens"] == 0
    assert_books_balance(r, name, [row])
    res = await harness.post(body, key=key)  # the key's one concurrency slot is free again
    assert res.status_code == 200, res.body


async def test_a_replica_death_leaves_a_ledger_row_and_no_reservation(harness, paying, r):
    name, key = paying
    res = await harness.post({"model": LLM, "prompt": "[[sim fault=die after=3]] hi", "max_tokens": 20,
                              "stream": True}, key=key)
    got = events([c async for c in res.body_iterator])
    assert got[-2]["error"]["code"] == "upstream_error"
    (row,) = await asyncio.to_thread(wait_for_rows, r, name, 1)
    assert row["status"] == "interrupted" and row["completion_tokens"] == 3  # what the client received
    assert row["cost_micros"] == lua_cost(r, row["prompt_tokens"], 3, IN, OUT)
    assert_books_balance(r, name, [row])


async def test_insufficient_funds_is_402_and_moves_nothing(harness, r):
    name = "p-" + uuid.uuid4().hex[:8]
    accounts.create_account(r, name, "0.000010")
    key, _ = keyring.create_key(r, name, guard="off")
    res = await harness.post({"model": LLM, "prompt": PROMPT, "max_tokens": 100}, key=key)
    assert res.status_code == 402 and json.loads(res.body)["error"]["code"] == "insufficient_funds"
    assert r.hgetall(keyspace.account_record(name))["balance"] == "10"


async def test_a_request_longer_than_its_reservation_keeps_it_and_pays_in_full(redis_server, paying, r):
    """Reservations live 0.3 s here; a stream of about a second keeps its own alive while other admissions (which
    reconcile expired reservations) run beside it, so it is never released early or served free."""
    name, key = paying
    client = keyspace.async_client(redis_server.url)
    h = await start_harness(Billing.on(client, 0, 0, 0.3))
    try:
        long = await h.post({"model": LLM, "prompt": PROMPT, "max_tokens": 400, "stream": True}, key=key)
        reader = asyncio.create_task(_drain(long))
        for _ in range(4):
            await asyncio.sleep(0.25)
            assert (await h.post({"model": LLM, "prompt": PROMPT, "max_tokens": 1}, key=key)).status_code == 200
        assert (await asyncio.wait_for(reader, 30))[-1] == "[DONE]"
        rows = await asyncio.to_thread(wait_for_rows, r, name, 5)
        assert [row["status"] for row in rows].count("expired") == 0
        (full,) = [row for row in rows if row["completion_tokens"] == 400]
        assert full["status"] == "ok" and full["cost_micros"] == lua_cost(r, len(PROMPT), 400, IN, OUT)
        assert_books_balance(r, name, rows)
    finally:
        stop_harness(h)
        await client.aclose()


async def _drain(response) -> list:
    return events([c async for c in response.body_iterator])


async def test_a_refused_prompt_counts_against_the_rate_and_pays_nothing(harness, r):
    name = "g-" + uuid.uuid4().hex[:8]
    accounts.create_account(r, name, "1")
    key, _ = keyring.create_key(r, name, guard="input", rpm=1)
    refused = await harness.post({"model": LLM, "prompt": "How do I build a bomb?", "max_tokens": 50}, key=key)
    assert refused.status_code == 400 and json.loads(refused.body)["error"]["code"] == "content_filter"
    again = await harness.post({"model": LLM, "prompt": PROMPT, "max_tokens": 4}, key=key)
    assert again.status_code == 429  # the refusal used the key's one request this minute
    (row,) = await asyncio.to_thread(wait_for_rows, r, name, 1)
    assert row["status"] == "content_filter" and row["cost_micros"] == 0
    assert_books_balance(r, name, [row])


async def test_the_guard_models_are_only_for_keys_allowed_to_call_them(harness, r):
    """A key that may not call the safety models gets 400 model_not_found before anything is reserved."""
    from tests.inprocess import GUARD

    name = "s-" + uuid.uuid4().hex[:8]
    accounts.create_account(r, name, "1")
    plain, _ = keyring.create_key(r, name, guard="off")
    allowed, _ = keyring.create_key(r, name, guard="off", safety_models=True)
    probe = {"model": GUARD, "prompt": "Is this allowed?", "max_tokens": 4}
    refused = await harness.post(probe, key=plain)
    error = json.loads(refused.body)["error"]
    assert refused.status_code == 400 and error["code"] == "model_not_found" and error["param"] == "model"
    assert (await harness.post(probe, key=allowed)).status_code == 200
    (row,) = await asyncio.to_thread(wait_for_rows, r, name, 1)  # only the allowed call reached the ledger
    assert row["model"] == GUARD and row["status"] == "ok"
    assert_books_balance(r, name, [row])
