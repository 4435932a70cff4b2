"""The admission and settlement scripts against a real Redis server, with several admitters standing in for
several ingress replicas."""

from __future__ import annotations

import asyncio
import uuid

import pytest
import redis

from serve_app.api.errors import ApiError, Code
from serve_app.config.service import Prices
from serve_app.money import accounts, keyring, keys, keyspace, units
from serve_app.money.admission import Admitter, key_is_active
from serve_app.money.ledger import ledger_rows
from serve_app.money.settlement import Settlement, Settler
from serve_app.money.status import Status
from tests.support import lua_cost

PRICES = Prices(input_usd_per_mtok="0.50", output_usd_per_mtok="1.50")  # 500_000 and 1_500_000 micros per Mtok


def customer(r, credits="10", **limits):
    name = "a-" + uuid.uuid4().hex[:8]
    accounts.create_account(r, name, credits)
    key, _ = keyring.create_key(r, name, **limits)
    return name, keys.key_hash(key)


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
    clients = [keyspace.async_client(redis_server.url) for _ in range(2)]
    return [(Admitter(c, 0, 0, 900), Settler(c)) for c in clients]


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
    await ledger.settle(Settlement(first.completion_id, 10, 5, Status.OK))  # 75 tokens unused come back
    await admit(admitter, kh, prompt=10, completion=10)


async def test_request_larger_than_tpm_is_refused_without_retry(r, replicas):
    _, kh = customer(r, tpm=50)
    with pytest.raises(ApiError) as info:
        await admit(replicas[0][0], kh, prompt=10, completion=80)
    assert info.value.headers == {"x-should-retry": "false"}


async def test_concurrent_reservations_never_overdraw(r, replicas):
    cost = lua_cost(r, 6, 16, PRICES.input_micros, PRICES.output_micros)
    name, kh = customer(r, credits=units.micros_to_usd(20 * cost + cost - 1))

    async def one(i):
        admitter, ledger = replicas[i % 2]
        try:
            a = await admit(admitter, kh)
        except ApiError as exc:
            assert exc.code is Code.INSUFFICIENT_FUNDS
            return 0
        await ledger.settle(Settlement(a.completion_id, 6, 16, Status.OK))
        return 1

    served = sum(await asyncio.gather(*(one(i) for i in range(200))))
    acct = r.hgetall(keyspace.account_record(name))
    rows = list(ledger_rows(r, name))
    assert int(acct["balance"]) == cost - 1 and int(acct["reserved"]) == 0
    assert served == len(rows) == 20
    assert sum(row["cost_micros"] for row in rows) == 20 * cost


async def test_settle_charges_actual_and_is_idempotent(r, replicas):
    name, kh = customer(r, credits="1")
    admitter, ledger = replicas[0]
    a = await admit(admitter, kh)
    assert a.reserved_micros == 27
    assert await ledger.settle(Settlement(a.completion_id, 6, 3, Status.OK)) == 8
    assert await ledger.settle(Settlement(a.completion_id, 6, 3, Status.OK)) is None
    acct = r.hgetall(keyspace.account_record(name))
    assert int(acct["balance"]) == 1_000_000 - 8 and int(acct["reserved"]) == 0


async def test_failed_upstream_pays_nothing(r, replicas):
    name, kh = customer(r, credits="1")
    admitter, ledger = replicas[0]
    a = await admit(admitter, kh)
    assert await ledger.settle(Settlement(a.completion_id, 6, 4, Status.UPSTREAM_ERROR)) == 0
    (row,) = ledger_rows(r, name)
    assert row["status"] == "upstream_error" and row["cost_usd"] == "0.000000"


@pytest.mark.parametrize("status", [Status.DISCONNECTED, Status.OUTPUT_FILTERED])
async def test_disconnected_and_filtered_pay_for_what_was_produced(r, replicas, status):
    name, kh = customer(r, credits="1")
    admitter, ledger = replicas[0]
    a = await admit(admitter, kh)
    assert await ledger.settle(Settlement(a.completion_id, 6, 5, status)) == lua_cost(r, 6, 5, 500_000, 1_500_000)
    (row,) = ledger_rows(r, name)
    assert row["status"] == status.value and row["cost_micros"] == 11  # 6 x 0.5 + 5 x 1.5 = 10.5, rounded up


async def test_expired_reservations_are_reconciled(r, redis_server):
    name, kh = customer(r, credits="1")
    short = Admitter(keyspace.async_client(redis_server.url), 0, 0, reservation_ttl_s=0.05)
    await admit(short, kh)
    assert int(r.hget(keyspace.account_record(name), "reserved")) == 27
    await asyncio.sleep(0.1)
    await admit(short, kh)  # this admission reconciles the first one
    rows = list(ledger_rows(r, name))
    assert [row["status"] for row in rows] == ["expired"]
    assert int(r.hget(keyspace.account_record(name), "reserved")) == 27


async def test_unknown_and_revoked_keys(r, replicas):
    admitter = replicas[0][0]
    with pytest.raises(ApiError) as info:
        await admit(admitter, keys.key_hash("qbt_nope"))
    assert info.value.code is Code.INVALID_API_KEY
    name = "a-" + uuid.uuid4().hex[:8]
    accounts.create_account(r, name, "1")
    key, _ = keyring.create_key(r, name)
    await admit(admitter, keys.key_hash(key))
    assert await admitter.authenticate(keys.key_hash(key)) == name and key_is_active(r, keys.key_hash(key))
    keyring.revoke_key(r, key)
    for check in (admit(admitter, keys.key_hash(key)), admitter.authenticate(keys.key_hash(key))):
        with pytest.raises(ApiError) as info:
            await check
        assert info.value.code is Code.INVALID_API_KEY
    assert not key_is_active(r, keys.key_hash(key))


async def test_redis_down_fails_closed_with_503():
    dead = Admitter(keyspace.async_client("redis://127.0.0.1:1/0"), 0, 0, 900)
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
    assert int(r.hget(keyspace.account_record(name), "reserved")) == first.reserved_micros == 27


async def test_client_survives_a_redis_restart(r, redis_server):
    name, kh = customer(r, credits="1")
    admitter = Admitter(keyspace.async_client(redis_server.url), 0, 0, 900)
    await admit(admitter, kh)
    redis_server.restart()
    await admit(admitter, kh)  # the pooled connection is dead; the client reconnects and retries
    assert int(redis.Redis.from_url(redis_server.url).hget(keyspace.account_record(name), "reserved")) == 54


@pytest.mark.parametrize("prompt, completion, pin, pout, micros", [
    (6, 3, 500_000, 1_500_000, 8),  # 7.5 rounds up
    (2, 0, 500_000, 0, 1),  # 1.0 exactly
    (0, 0, 500_000, 1_500_000, 0),
    (6, 16, 500_000, 1_500_000, 27),
    (1, 0, 1, 0, 1),  # any fraction of a micro-dollar is a micro-dollar
    (1_000_000, 1_000_000, 60_000_000, 60_000_000, 120_000_000),  # $60 per Mtok, a million tokens each way
])
def test_the_cost_rule_in_the_scripts_rounds_up_to_the_micro_dollar(r, prompt, completion, pin, pout, micros):
    assert lua_cost(r, prompt, completion, pin, pout) == micros


async def test_reservations_hold_exactly_the_fields_settlement_reads(r, replicas):
    from serve_app.money import lua

    _, kh = customer(r, credits="1")
    a = await admit(replicas[0][0], kh)
    stored = r.hgetall(keyspace.reservation(a.completion_id))
    assert set(stored) == set(lua.RESERVATION_FIELDS) | {"reply", "slot", "budgeted"}  # optional, read on their own


async def test_a_corrupt_reservation_is_set_aside_and_never_blocks_admission(r, redis_server):
    name, kh = customer(r, credits="1")
    short = Admitter(keyspace.async_client(redis_server.url), 0, 0, reservation_ttl_s=0.05)
    broken = await admit(short, kh)
    r.hdel(keyspace.reservation(broken.completion_id), "pin")  # a reservation missing a field
    before = int(r.hget(keyspace.STATS, "corrupt_reservations") or 0)
    await asyncio.sleep(0.1)
    for _ in range(3):  # every later admission, for this account or any other, still works
        await admit(short, kh)
    assert r.exists(keyspace.CORRUPT_PREFIX + broken.completion_id)
    assert not r.exists(keyspace.reservation(broken.completion_id))
    assert int(r.hget(keyspace.STATS, "corrupt_reservations")) == before + 1


async def test_settling_a_corrupt_reservation_moves_it_aside_and_writes_nothing(r, replicas):
    name, kh = customer(r, credits="1")
    admitter, ledger = replicas[0]
    a = await admit(admitter, kh)
    r.hset(keyspace.reservation(a.completion_id), "reserved", "lots")
    assert await ledger.settle(Settlement(a.completion_id, 6, 3, Status.OK)) is None
    assert r.exists(keyspace.CORRUPT_PREFIX + a.completion_id) and list(ledger_rows(r, name)) == []
    assert int(r.hget(keyspace.account_record(name), "balance")) == 1_000_000


async def test_a_settlement_after_expiry_charges_what_was_produced_once(r, redis_server):
    name, kh = customer(r, credits="1")
    client = keyspace.async_client(redis_server.url)
    short, settler = Admitter(client, 0, 0, reservation_ttl_s=0.05), Settler(client)
    slow = await admit(short, kh)  # a request that outlives its reservation
    await asyncio.sleep(0.1)
    await admit(short, kh)  # reconciles it as expired, releasing its funds
    late = Settlement(slow.completion_id, 6, 16, Status.OK, slow.account, slow.key_id, slow.model,
                      PRICES.input_micros, PRICES.output_micros, slow.request_id)
    assert await settler.settle(late) == 27
    assert await settler.settle(late) is None  # a replay charges nothing
    rows = [row for row in ledger_rows(r, name) if row["completion_id"] == slow.completion_id]
    assert [(row["status"], row["cost_micros"]) for row in rows] == [("expired", 0), ("ok", 27)]
    acct = r.hgetall(keyspace.account_record(name))
    assert int(acct["balance"]) == 1_000_000 - 27 and int(acct["spent"]) == 27


async def test_a_crashed_ingress_stream_is_charged_what_was_checkpointed_and_a_late_settlement_the_rest(
        r, redis_server):
    """The ingress's lease checkpoints what a stream delivered; when the ingress is gone, the reconciliation charges
    that; if the settlement still arrives, it charges only the rest: together, exactly the one-row cost."""
    from deployments.wire import Usage
    from serve_app.money.leases import Leases

    name, kh = customer(r, credits="1")
    client = keyspace.async_client(redis_server.url)
    short, settler = Admitter(client, 0, 0, reservation_ttl_s=0.3), Settler(client)
    leases = Leases(client, 0.3)
    streaming = await admit(short, kh)
    streaming.delivered = Usage(6, 9)  # the client has received 9 tokens
    leases.held[streaming.completion_id] = streaming
    await leases.renew()  # the last checkpoint before the ingress died (no renewal after it)
    await asyncio.sleep(0.4)
    other = await admit(short, kh)  # reconciles it: charges the 9 tokens delivered
    rows = [row for row in ledger_rows(r, name) if row["completion_id"] == streaming.completion_id]
    assert [(row["status"], row["completion_tokens"], row["cost_micros"]) for row in rows] == [
        ("expired", 9, lua_cost(r, 6, 9, PRICES.input_micros, PRICES.output_micros))]
    late = Settlement(streaming.completion_id, 6, 16, Status.DISCONNECTED, streaming.account, streaming.key_id,
                      streaming.model, PRICES.input_micros, PRICES.output_micros, streaming.request_id)
    await settler.settle(late)
    rows = [row for row in ledger_rows(r, name) if row["completion_id"] == streaming.completion_id]
    assert [(row["status"], row["prompt_tokens"], row["completion_tokens"]) for row in rows] == [
        ("expired", 6, 9), ("disconnected", 0, 7)]
    total = lua_cost(r, 6, 16, PRICES.input_micros, PRICES.output_micros)
    assert sum(row["cost_micros"] for row in rows) == total
    acct = r.hgetall(keyspace.account_record(name))
    assert int(acct["balance"]) == 1_000_000 - total and int(acct["reserved"]) == other.reserved_micros


async def test_settlement_retries_dropped_connections_but_never_script_errors():
    from redis.exceptions import ConnectionError, MasterDownError, OutOfMemoryError, ReadOnlyError, ResponseError

    class Flaky:
        def __init__(self, errors):
            self.errors, self.calls = list(errors), 0

        def register_script(self, _):
            async def run(keys, args):
                self.calls += 1
                if self.errors:
                    raise self.errors.pop(0)
                return ["ok", 8]
            return run

    dropped = Flaky([ConnectionError("reset")])
    assert await Settler(dropped).settle(Settlement("c", 6, 3, Status.OK)) == 8 and dropped.calls == 2
    failed = Flaky([ResponseError("ERR script failed")])
    assert await Settler(failed).settle(Settlement("c", 6, 3, Status.OK)) is None and failed.calls == 1
    # A failover's old master, a full memory: refused before any write, so retried like a dropped connection.
    refused = Flaky([ReadOnlyError("READONLY"), OutOfMemoryError("OOM"), MasterDownError("MASTERDOWN")])
    assert await Settler(refused, backoff_cap_s=0.01).settle(Settlement("c", 6, 3, Status.OK)) == 8
    assert refused.calls == 4
    outage = Flaky([ConnectionError("down")] * 1000)
    assert await Settler(outage, retry_s=0.2, backoff_cap_s=0.02).settle(Settlement("c", 6, 3, Status.OK)) is None
    assert 2 < outage.calls < 100  # retried until retry_s, then given up (the reservation expires)


def test_operator_writes_are_whole_and_a_retried_topup_credits_once(r):
    name, _ = customer(r, credits="1")
    accounts.topup(r, name, "2.50", idempotency_key="inv-42")
    accounts.topup(r, name, "2.50", idempotency_key="inv-42")  # the retry
    assert accounts.show_account(r, name)["balance_usd"] == "3.500000"
    with pytest.raises(accounts.AccountError, match="was used for a top-up"):
        accounts.topup(r, name, "9", idempotency_key="inv-42")
    accounts.topup(r, name, "0.5")  # without a key, every call credits
    assert accounts.show_account(r, name)["balance_usd"] == "4.000000"
    with pytest.raises(accounts.AccountError):
        accounts.topup(r, "no-such-" + name, "1", idempotency_key="x")
    assert not r.exists(keyspace.topup_idempotency("no-such-" + name, "x"))
    with pytest.raises(accounts.AccountError):
        keyring.create_key(r, "no-such-" + name)
    assert set(r.hgetall(keyspace.account_record(name))) >= {"balance", "reserved", "spent", "created_ms"}


async def test_acknowledged_money_writes_survive_kill_9(r, redis_server):
    name, kh = customer(r, credits="1")
    client = keyspace.async_client(redis_server.url)
    admitter, settler = Admitter(client, 0, 0, 900), Settler(client)
    a = await admit(admitter, kh)
    assert await settler.settle(Settlement(a.completion_id, 6, 16, Status.OK)) == 27
    accounts.topup(r, name, "0.25", idempotency_key="t-1")
    key_name, key = "k-" + uuid.uuid4().hex[:6], None
    accounts.create_account(r, key_name, "1")
    key, _ = keyring.create_key(r, key_name)
    keyring.revoke_key(r, key)
    redis_server.crash_and_restart()
    fresh = redis.Redis.from_url(redis_server.url, decode_responses=True)
    assert accounts.show_account(fresh, name)["balance_usd"] == "1.249973"
    assert [row["cost_micros"] for row in ledger_rows(fresh, name)] == [27]
    assert not key_is_active(fresh, keys.key_hash(key))
    await client.aclose()


async def test_a_key_is_revoked_by_its_id_and_limits_are_positive(r, replicas):
    """A key reported leaked by its id (as listed, and as in the ledger) is revoked without its secret; a key's own
    limit is a positive count (0 or a negative value would read as 'unlimited'), absent means the default."""
    (admitter, _), _ = replicas
    name = "k-" + uuid.uuid4().hex[:8]
    accounts.create_account(r, name, "1")
    key, kid = keyring.create_key(r, name)
    other, _ = keyring.create_key(r, name)
    assert [k["key_id"] for k in keyring.list_keys(r, name) if k["key_id"] == kid] == [kid]
    assert keyring.revoke_key(r, kid) == kid
    assert await outcome(admit(admitter, keys.key_hash(key))) is Code.INVALID_API_KEY
    assert not isinstance(await outcome(admit(admitter, keys.key_hash(other))), Code)  # the other key still works
    with pytest.raises(accounts.AccountError, match="no such key id"):
        keyring.revoke_key(r, "key_000000000000")
    for bad in (0, -5):
        with pytest.raises(accounts.AccountError, match="greater than or equal to 1"):
            keyring.create_key(r, name, rpm=bad)
        with pytest.raises(accounts.AccountError, match="greater than or equal to 1"):
            keyring.create_key(r, name, tpm=bad)


async def test_a_keys_concurrent_requests_are_capped_and_slots_never_leak(r, redis_server):
    """Taken at admission, given back by settlement, by the reconciliation of an expired reservation (a dead
    ingress), and never twice."""
    name, kh = customer(r, credits="1", concurrency=2)
    client = keyspace.async_client(redis_server.url)
    admitter, settler = Admitter(client, 0, 0, 900), Settler(client)
    first, second = await admit(admitter, kh), await admit(admitter, kh)
    refused = await outcome(admit(admitter, kh))
    assert refused is Code.RATE_LIMIT_EXCEEDED
    await settler.settle(Settlement(first.completion_id, 6, 3, Status.OK))
    await settler.settle(Settlement(first.completion_id, 6, 3, Status.OK))  # a replay gives nothing back twice
    third = await admit(admitter, kh)
    assert int(r.hget(keyspace.key_record(kh), "inflight")) == 2
    short = Admitter(client, 0, 0, reservation_ttl_s=0.05)
    r.zadd(keyspace.RESERVATION_EXPIRY, {second.completion_id: 0, third.completion_id: 0})  # their ingress died
    await asyncio.sleep(0.1)
    other_name, other = customer(r, credits="1")
    await admit(short, other)  # any admission reconciles them
    assert int(r.hget(keyspace.key_record(kh), "inflight")) == 0
    assert not isinstance(await outcome(admit(admitter, kh)), Code)
    with pytest.raises(accounts.AccountError, match="greater than or equal to 1"):
        keyring.create_key(r, name, concurrency=0)
