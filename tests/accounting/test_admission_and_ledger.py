"""The admission and settlement scripts against a real Redis server, with several admitters standing in for
several ingress replicas."""

from __future__ import annotations

import asyncio
import time
import uuid

import pytest
import redis

from serve_app import accounts, auth, store
from serve_app.admission import Admitter, Prices
from serve_app.errors import ApiError, Code
from serve_app.ledger import Ledger, Settlement, ledger_rows

PRICES = Prices(500_000, 1_500_000)


def customer(r, credits="10", **limits):
    name = "a-" + uuid.uuid4().hex[:8]
    accounts.create_account(r, name, credits)
    key, _ = accounts.create_key(r, name, **limits)
    return name, auth.key_hash(key)


async def admit(admitter, key_hash, prompt=6, completion=16):
    cid = "cmpl-" + uuid.uuid4().hex
    return await admitter.admit(key_hash, cid, cid, "m", PRICES, prompt, completion)


async def outcome(coro):
    try:
        return await coro
    except ApiError as exc:
        return exc.code


@pytest.fixture
def replicas(redis_server):
    """Two admitters and ledgers on separate connection pools, as two ingress replicas would have."""
    clients = [store.async_client(redis_server.url) for _ in range(2)]
    return [(Admitter(c, 0, 0, 900), Ledger(c)) for c in clients]


async def test_rpm_holds_across_two_replicas(r, replicas):
    _, kh = customer(r, rpm=10)
    results = await asyncio.gather(*(outcome(admit(replicas[i % 2][0], kh)) for i in range(30)))
    admitted = [x for x in results if not isinstance(x, Code)]
    assert len(admitted) == 10, results
    assert results.count(Code.RATE_LIMIT_EXCEEDED) == 20
    assert sorted(a.limits.rpm_remaining for a in admitted) == list(range(10))


async def test_gcra_admits_again_after_the_interval(r, replicas):
    _, kh = customer(r, rpm=60)  # one request a second, burst of 60
    admitter = replicas[0][0]
    await asyncio.gather(*(admit(admitter, kh) for _ in range(60)))
    with pytest.raises(ApiError) as info:
        await admit(admitter, kh)
    assert info.value.headers["Retry-After"] == "1"
    await asyncio.sleep(1.05)
    await admit(admitter, kh)


async def test_tpm_counts_worst_case_and_refunds_unused(r, replicas):
    _, kh = customer(r, tpm=100)
    admitter, ledger = replicas[0]
    first = await admit(admitter, kh, prompt=10, completion=80)  # 90 of 100 tokens
    with pytest.raises(ApiError) as info:
        await admit(admitter, kh, prompt=10, completion=10)
    assert info.value.code is Code.RATE_LIMIT_EXCEEDED
    await ledger.settle(Settlement(first.completion_id, 10, 5, "ok"))  # 75 tokens unused come back
    await admit(admitter, kh, prompt=10, completion=10)


async def test_request_larger_than_tpm_is_refused_without_retry(r, replicas):
    _, kh = customer(r, tpm=50)
    with pytest.raises(ApiError) as info:
        await admit(replicas[0][0], kh, prompt=10, completion=80)
    assert info.value.headers == {"x-should-retry": "false"}


async def test_concurrent_reservations_never_overdraw(r, replicas):
    cost = store.cost_micros(6, 16, PRICES.input_micros_per_mtok, PRICES.output_micros_per_mtok)
    name, kh = customer(r, credits=store.micros_to_usd(20 * cost + cost - 1))

    async def one(i):
        admitter, ledger = replicas[i % 2]
        try:
            a = await admit(admitter, kh)
        except ApiError as exc:
            assert exc.code is Code.INSUFFICIENT_FUNDS
            return 0
        await ledger.settle(Settlement(a.completion_id, 6, 16, "ok"))
        return 1

    served = sum(await asyncio.gather(*(one(i) for i in range(200))))
    acct = r.hgetall(store.account_record(name))
    rows = list(ledger_rows(r, name))
    assert int(acct["balance"]) == cost - 1 and int(acct["reserved"]) == 0
    assert served == len(rows) == 20
    assert sum(row["cost_micros"] for row in rows) == 20 * cost


async def test_settle_charges_actual_and_is_idempotent(r, replicas):
    name, kh = customer(r, credits="1")
    admitter, ledger = replicas[0]
    a = await admit(admitter, kh)
    assert a.reserved_micros == 27
    assert await ledger.settle(Settlement(a.completion_id, 6, 3, "ok")) == 8
    assert await ledger.settle(Settlement(a.completion_id, 6, 3, "ok")) is None
    acct = r.hgetall(store.account_record(name))
    assert int(acct["balance"]) == 1_000_000 - 8 and int(acct["reserved"]) == 0


async def test_failed_upstream_pays_nothing(r, replicas):
    name, kh = customer(r, credits="1")
    admitter, ledger = replicas[0]
    a = await admit(admitter, kh)
    assert await ledger.settle(Settlement(a.completion_id, 6, 4, "upstream_error", charge=False)) == 0
    (row,) = ledger_rows(r, name)
    assert row["status"] == "upstream_error" and row["cost_usd"] == "0.000000"


async def test_expired_reservations_are_reconciled(r, redis_server):
    name, kh = customer(r, credits="1")
    short = Admitter(store.async_client(redis_server.url), 0, 0, reservation_ttl_s=0.05)
    await admit(short, kh)
    assert int(r.hget(store.account_record(name), "reserved")) == 27
    time.sleep(0.1)
    await admit(short, kh)  # this admission reconciles the first one
    rows = list(ledger_rows(r, name))
    assert [row["status"] for row in rows] == ["expired"]
    assert int(r.hget(store.account_record(name), "reserved")) == 27


async def test_unknown_and_revoked_keys(r, replicas):
    with pytest.raises(ApiError) as info:
        await admit(replicas[0][0], auth.key_hash("qbt_nope"))
    assert info.value.code is Code.INVALID_API_KEY


async def test_redis_down_fails_closed_with_503():
    dead = Admitter(store.async_client("redis://127.0.0.1:1/0"), 0, 0, 900)
    with pytest.raises(ApiError) as info:
        await admit(dead, "0" * 64)
    assert info.value.status == 503 and info.value.headers["Retry-After"]


def test_balances_survive_a_redis_restart(r, redis_server):
    name, _ = customer(r, credits="3.5")
    accounts.topup(r, name, "1.25")
    redis_server.restart()
    fresh = redis.Redis.from_url(redis_server.url, decode_responses=True)
    assert accounts.show_account(fresh, name)["balance_usd"] == "4.750000"


async def test_admission_replay_does_not_reserve_twice(r, replicas):
    name, kh = customer(r, credits="1")
    admitter = replicas[0][0]
    first = await admitter.admit(kh, "cmpl-replay", "req-1", "m", PRICES, 6, 16)
    again = await admitter.admit(kh, "cmpl-replay", "req-1", "m", PRICES, 6, 16)
    assert again == first
    assert int(r.hget(store.account_record(name), "reserved")) == first.reserved_micros == 27


async def test_client_survives_a_redis_restart(r, redis_server):
    name, kh = customer(r, credits="1")
    admitter = Admitter(store.async_client(redis_server.url), 0, 0, 900)
    await admit(admitter, kh)
    redis_server.restart()
    await admit(admitter, kh)  # the pooled connection is dead; the client reconnects and retries
    assert int(redis.Redis.from_url(redis_server.url).hget(store.account_record(name), "reserved")) == 54
