"""A key's life inside the admission script, on a real Redis: expiry, rotation with a grace period, budgets with a
reset period (exact under 200 concurrent requests), allowed models, and the audit row every change leaves."""

from __future__ import annotations

import asyncio
import random
import uuid
from datetime import datetime, timedelta, timezone

import pytest

from serve_app.admin import audit
from serve_app.api.errors import ApiError, Code
from serve_app.money import accounts, keyring, keys, keyspace, lua
from serve_app.money.accounts import AccountError, Change
from serve_app.money.settlement import Settlement
from serve_app.money.status import Status
from tests.redis.test_admission_and_settlement import PRICES, admit, outcome, replicas  # noqa: F401 (fixture)

WORST = 27  # micro-dollars: 6 prompt + 16 completion tokens at PRICES, rounded up
SETTLED = 15  # 6 prompt + 8 completion tokens


def account(r, credits="10") -> str:
    name = "k-" + uuid.uuid4().hex[:8]
    accounts.create_account(r, name, credits)
    return name


async def settle(settler, a, completion=8):
    return await settler.settle(Settlement(a.completion_id, 6, completion, Status.OK, a.account, a.key_id,
                                           a.model, a.input_micros, a.output_micros, a.request_id))


async def test_an_expired_key_is_refused_by_redis_clock(r, replicas):
    admitter, _ = replicas[0]
    name = account(r)
    key, kid = keyring.create_key(r, name, expires_in_s=1)
    assert (await admit(admitter, keys.key_hash(key))).key_id == kid
    view = keyring.list_keys(r, name)[0]
    assert view["expires_at"] is not None
    await asyncio.sleep(1.1)
    assert await outcome(admit(admitter, keys.key_hash(key))) is Code.INVALID_API_KEY
    with pytest.raises(ApiError):
        await admitter.authenticate(keys.key_hash(key))
    past, _ = keyring.create_key(r, name, expires_at=datetime.now(timezone.utc) - timedelta(seconds=1))
    assert await outcome(admit(admitter, keys.key_hash(past))) is Code.INVALID_API_KEY


async def test_rotation_keeps_both_secrets_for_the_grace_then_only_the_new(r, replicas):
    admitter, _ = replicas[0]
    name = account(r)
    old, kid = keyring.create_key(r, name, rpm=3)
    new, view = keyring.rotate_key(r, kid, grace_s=1)
    assert new != old and view["key_id"] == kid and view["grace_until"] is not None
    # One key: the two secrets share its limits (3 requests a minute in all), its id and its account.
    got = [await outcome(admit(admitter, keys.key_hash(s))) for s in (old, new, old, new)]
    assert [g.key_id for g in got[:3]] == [kid] * 3 and got[3] is Code.RATE_LIMIT_EXCEEDED
    await asyncio.sleep(1.1)
    assert await outcome(admit(admitter, keys.key_hash(old))) is Code.INVALID_API_KEY
    assert await admitter.authenticate(keys.key_hash(new)) == name
    # Rotating again: the newest secret gets the grace; the first one stays ended.
    newer, _ = keyring.rotate_key(r, new, grace_s=60)
    assert await admitter.authenticate(keys.key_hash(new)) == name
    assert await admitter.authenticate(keys.key_hash(newer)) == name
    assert await outcome(admitter.authenticate(keys.key_hash(old))) is Code.INVALID_API_KEY
    # Revoked by its id, every secret stops at once; a revoked key cannot be rotated.
    assert keyring.revoke_key(r, kid) == kid
    for secret in (new, newer):
        assert await outcome(admitter.authenticate(keys.key_hash(secret))) is Code.INVALID_API_KEY
    with pytest.raises(AccountError, match="revoked"):
        keyring.rotate_key(r, kid, grace_s=0)
    assert [k["key_id"] for k in keyring.list_keys(r, name)] == [kid]  # the secrets are not keys of their own


async def test_a_budget_holds_under_200_concurrent_requests(r, replicas):
    name = account(r, credits="100")
    key, kid = keyring.create_key(r, name, budget_usd="0.001", budget_period="day")
    kh = keys.key_hash(key)
    first = await asyncio.gather(*(outcome(admit(replicas[i % 2][0], kh)) for i in range(200)))
    admitted = [a for a in first if not isinstance(a, Code)]
    assert len(admitted) == 1000 // WORST  # the worst case of each is held: never more than the budget
    assert first.count(Code.INSUFFICIENT_FUNDS) == 200 - len(admitted)
    await asyncio.gather(*(settle(replicas[i % 2][1], a) for i, a in enumerate(admitted)))
    spent = len(admitted) * SETTLED
    assert keyring.list_keys(r, name)[0]["budget_spent_usd"] == f"0.{spent:06d}"
    second = await asyncio.gather(*(outcome(admit(replicas[i % 2][0], kh)) for i in range(200)))
    again = [a for a in second if not isinstance(a, Code)]
    assert len(again) == (1000 - spent) // WORST
    await asyncio.gather(*(settle(replicas[0][1], a, completion=16) for a in again))
    total = spent + len(again) * WORST
    view = keyring.list_keys(r, name)[0]
    assert total <= 1000 and view["budget_spent_usd"] == f"0.{total:06d}"
    assert accounts.show_account(r, name)["spent_usd"] == f"0.{total:06d}"  # the account paid what the key spent
    assert int(r.hget(keyspace.key_record(kh), "budget_reserved")) == 0
    refused = await outcome(admit(replicas[0][0], kh))
    assert refused is Code.INSUFFICIENT_FUNDS
    with pytest.raises(ApiError) as info:
        await admit(replicas[0][0], kh)
    assert info.value.detail["budget_period"] == "day" and "budget" in info.value.message


async def test_a_new_period_starts_the_budget_again_without_a_job(r, replicas):
    admitter, settler = replicas[0]
    name = account(r)
    key, _ = keyring.create_key(r, name, budget_usd="0.000030", budget_period="month")
    kh = keys.key_hash(key)
    await settle(settler, await admit(admitter, kh), completion=16)
    assert await outcome(admit(admitter, kh)) is Code.INSUFFICIENT_FUNDS
    # As if the month had turned: the stored window is an older one; the next admission finds a new period.
    r.hset(keyspace.key_record(kh), "budget_window", "0")
    assert keyring.list_keys(r, name)[0]["budget_spent_usd"] == "0.000000"
    assert (await admit(admitter, kh)).reserved_micros == WORST


@pytest.mark.parametrize("period", ["day", "week", "month", "total"])
def test_the_period_rule_matches_the_calendar(r, period):
    script = lua.script(lua.CLOCK, lua.BUDGET, "return period_start(ARGV[1], tonumber(ARGV[2]))")
    rng = random.Random(7)
    for _ in range(300):
        t = rng.randrange(0, 4_102_444_800_000)  # 1970 to 2100
        when = datetime.fromtimestamp(t / 1000, tz=timezone.utc)
        day = when.replace(hour=0, minute=0, second=0, microsecond=0)
        expected = {"day": day, "week": day - timedelta(days=day.weekday()), "month": day.replace(day=1),
                    "total": datetime.fromtimestamp(0, tz=timezone.utc)}[period]
        assert r.eval(script, 0, period, t) == int(expected.timestamp() * 1000), when


async def test_a_key_calls_only_its_allowed_models(r, replicas):
    admitter, _ = replicas[0]
    name = account(r)
    key, _ = keyring.create_key(r, name, models=["m", "other"])
    assert (await admit(admitter, keys.key_hash(key))).model == "m"  # `admit` asks for model "m"
    narrow, _ = keyring.create_key(r, name, models=["other"])
    access = await admitter.key_access(keys.key_hash(narrow))  # what GET /v1/models lists
    assert access.account == name and access.allows("other") and not access.allows("m")
    assert (await admitter.key_access(keys.key_hash(key))).models == frozenset({"m", "other"})
    with pytest.raises(ApiError) as info:
        await admit(admitter, keys.key_hash(narrow))
    assert info.value.code is Code.MODEL_NOT_FOUND and info.value.param == "model"
    with pytest.raises(AccountError, match="no such model"):
        keyring.create_key(r, name, known_models={"m"}, models=["nope"])
    for bad in ({"models": []}, {"budget_usd": "-1"}, {"budget_period": "day"}, {"budget_usd": "0.0000001"},
                {"expires_in_s": 5, "expires_at": datetime.now(timezone.utc)}, {"color": "red"}):
        with pytest.raises(AccountError):
            keyring.create_key(r, name, **bad)


def test_every_change_leaves_an_audit_row_with_before_and_after(r):
    name = "audit-" + uuid.uuid4().hex[:8]
    who = Change(actor="admin:alice", request_id="req_" + uuid.uuid4().hex)
    accounts.create_account(r, name, "1", who)
    accounts.topup(r, name, "2.5", "inv-1", who)
    accounts.topup(r, name, "2.5", "inv-1", who)  # a replay changes nothing and leaves no row
    _, kid = keyring.create_key(r, name, who, budget_usd="5", models=["m"])
    keyring.rotate_key(r, kid, 60, who)
    keyring.revoke_key(r, kid, who)
    mine = [row for row in audit.recent(r, 200) if row["target"] in (name, kid)]
    assert [row["action"] for row in reversed(mine)] == [
        "account.create", "account.topup", "key.create", "key.rotate", "key.revoke"]
    assert all(row["actor"] == "admin:alice" and row["request_id"] == who.request_id and row["at"] for row in mine)
    create, topup = mine[-1], mine[-2]
    assert create["before"] is None and create["after"]["balance"] == "1000000"
    assert topup["before"]["balance"] == "1000000" and topup["after"]["balance"] == "3500000"
    revoke = mine[0]
    assert revoke["before"]["revoked"] == "0" and revoke["after"]["revoked"] == "1"
    assert revoke["after"]["budget_micros"] == "5000000" and revoke["after"]["models"] == "m"
    for row in mine:  # no secret and no secret's hash in the log
        text = str(row)
        assert "qbt_" not in text and "current_secret" not in text and "alias_of" not in text


def test_a_retried_create_of_a_key_for_no_account_changes_nothing(r):
    before = r.xlen(keyspace.AUDIT)
    with pytest.raises(accounts.NotFound):
        keyring.create_key(r, "no-such-" + uuid.uuid4().hex[:6])
    assert r.xlen(keyspace.AUDIT) == before


async def test_a_late_settlement_after_expiry_counts_against_the_budget_too(r, redis_server):
    """An ingress that died mid-stream: the reconciliation charges what was checkpointed and releases the hold; the
    settlement that still arrives charges the rest. The key's budget counts both, as the account pays both."""
    from deployments.wire import Usage
    from serve_app.money.admission import Admitter
    from serve_app.money.leases import Leases
    from serve_app.money.settlement import Settler

    name = account(r)
    key, _ = keyring.create_key(r, name, budget_usd="1", budget_period="total")
    kh = keys.key_hash(key)
    client = keyspace.async_client(redis_server.url)
    short, settler, leases = Admitter(client, 0, 0, reservation_ttl_s=0.3), Settler(client), Leases(client, 0.3)
    streaming = await admit(short, kh)
    streaming.delivered = Usage(6, 9)
    leases.held[streaming.completion_id] = streaming
    await leases.renew()
    await asyncio.sleep(0.4)
    other = await admit(short, kh)  # reconciles the first as expired
    await settle(settler, streaming, completion=16)  # late: the rest
    await settle(settler, other, completion=16)
    spent = accounts.show_account(r, name)["spent_usd"]
    assert spent == f"0.{2 * WORST:06d}"
    assert keyring.list_keys(r, name)[0]["budget_spent_usd"] == spent
    assert int(r.hget(keyspace.key_record(kh), "budget_reserved")) == 0
