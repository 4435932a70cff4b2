"""Admission in ONE Redis round trip: authenticate the key, check its rate limits, reserve the worst-case cost.

The script is idempotent per completion id (a replay returns the stored reply), so the client may retry it after a
dropped connection without reserving twice. Time is Redis's own clock, so limits do not depend on the clocks of the
ingress hosts or on the order in which concurrent scripts run. The script also reconciles a few expired reservations
on each call (left by an ingress that died mid-request), so that no reservation stays stuck without a separate
sweeper process; a corrupt one is set aside, never read half-way, so it cannot block admission for anyone. Everything happens in one Lua script, so any number of ingress replicas stay exact.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Protocol

from deployments.wire import Usage
from serve_app.api.errors import ApiError, Code
from serve_app.money import keyspace, lua, units
from serve_app.money.limits import LimitState, rate_limit_error
from serve_app.money.status import Status

log = logging.getLogger("qbt.admission")

RECONCILE_BATCH = 8

ADMIT_LUA = lua.script(lua.CLOCK, lua.COST, lua.ACTIVE_KEY, lua.BUDGET, lua.RESERVATION, lua.LEDGER_ROW, """
local expired = redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', now, 'LIMIT', 0, $batch)
for _, rid in ipairs(expired) do
  local rk = '$reservation_prefix' .. rid
  local r, state = read_reservation(rk)
  if state == 'ok' then
    -- The ingress that held it is gone (its lease stopped): charge what its client had received, as checkpointed.
    local acct = '$account_prefix' .. r.account
    local dp, dc = delivered(rk)
    local cost = 0
    if dc > 0 then cost = math.min(cost_micros(dp, dc, tonumber(r.pin), tonumber(r.pout)), tonumber(r.reserved)) end
    redis.call('HINCRBY', acct, 'reserved', 0 - tonumber(r.reserved))
    release_slot(rk)
    settle_budget(rk, cost)
    if dc > 0 then  -- as a settlement would count it (a late one then counts only the rest)
      redis.call('HINCRBY', acct, 'balance', 0 - cost)
      redis.call('HINCRBY', acct, 'spent', cost)
      redis.call('HINCRBY', acct, 'requests', 1)
      redis.call('HINCRBY', acct, 'prompt_tokens', dp)
      redis.call('HINCRBY', acct, 'completion_tokens', dc)
    end
    ledger_row(KEYS[2], rid, r, dp, dc, cost, '$expired', now)
    local budgeted = budget_record(rk)
    redis.call('DEL', rk)
    mark_expired(rid, cost, dp, dc, budgeted)
  elseif state == 'corrupt' then
    set_aside(rk, rid)
  end
  redis.call('ZREM', KEYS[3], rid)
end

local rk = '$reservation_prefix' .. ARGV[1]
local replayed = redis.call('HGET', rk, 'reply')
if replayed then return cjson.decode(replayed) end

local k = active_key(KEYS[1])
if not k then return {'invalid_api_key'} end
-- The guard models judge everyone's traffic: calling them directly (probing what passes) takes a key allowed to.
if ARGV[11] == '1' and k.safety_models ~= '1' then return {'safety_model'} end
if k.models and k.models ~= '' and not string.find(',' .. k.models .. ',', ',' .. ARGV[9] .. ',', 1, true) then
  return {'model_not_allowed'}
end
local acct = '$account_prefix' .. k.account
local prompt, completion = tonumber(ARGV[2]), tonumber(ARGV[3])
local tokens = prompt + completion

local function gcra(limit, tat, cost)
  if limit <= 0 then return 1, 0, 0, 0 end
  local interval = 60000 / limit
  local base = math.max(tonumber(tat) or 0, now)
  local new_tat = base + cost * interval
  local over = new_tat - now - 60000
  if over > 0.001 then
    return 0, 0, math.ceil(over), base
  end
  return 1, math.floor((60000 - (new_tat - now)) / interval), math.ceil(new_tat - now), new_tat
end

local rpm = tonumber(k.rpm) or tonumber(ARGV[7])
local tpm = tonumber(k.tpm) or tonumber(ARGV[8])
local r_ok, r_rem, r_reset, r_tat = gcra(rpm, k.rpm_tat, 1)
local t_ok, t_rem, t_reset, t_tat = gcra(tpm, k.tpm_tat, tokens)
if r_ok == 0 then return {'rate_limit_exceeded', 'requests', rpm, r_rem, r_reset, tpm, t_rem, t_reset} end
if t_ok == 0 then
  if tpm > 0 and tokens > tpm then return {'rate_limit_exceeded', 'tokens_over', tpm, tokens, 0, rpm, r_rem, 0} end
  return {'rate_limit_exceeded', 'tokens', rpm, r_rem, r_reset, tpm, t_rem, t_reset}
end
local cap = tonumber(k.concurrency) or tonumber(ARGV[12]) or 0
if cap > 0 and (tonumber(k.inflight) or 0) >= cap then return {'rate_limit_exceeded', 'concurrency', cap} end

local pin, pout = tonumber(ARGV[4]), tonumber(ARGV[5])
local cost = cost_micros(prompt, completion, pin, pout)
local a = redis.call('HMGET', acct, 'balance', 'reserved')
if not a[1] then return {'invalid_api_key'} end
local available = tonumber(a[1]) - (tonumber(a[2]) or 0)
if cost > available then return {'insufficient_funds', cost, available} end
local budget = tonumber(k.budget)
local window = 0
if budget then
  window = period_start(k.budget_period or 'total', now)
  local left = budget - budget_spent(k.budget_window, k.budget_spent, k.budget_period) - (tonumber(k.budget_reserved) or 0)
  if cost > left then return {'budget_exceeded', cost, math.max(left, 0), budget, k.budget_period or 'total'} end
end

local reply = {'ok', k.account, k.key_id, cost, rpm, r_rem, r_reset, tpm, t_rem, t_reset, k.guard or ''}
local rsv = reservation_args({account = k.account, key_id = k.key_id, reserved = cost, tokens = tokens,
  model = ARGV[9], created = now, keyrec = k.record, pin = pin, pout = pout, tpm = tpm, request_id = ARGV[10]})
if rpm > 0 then redis.call('HSET', k.record, 'rpm_tat', tostring(r_tat)) end
if tpm > 0 then redis.call('HSET', k.record, 'tpm_tat', tostring(t_tat)) end
redis.call('HINCRBY', acct, 'reserved', cost)
if cap > 0 then redis.call('HINCRBY', k.record, 'inflight', 1) end
if budget then
  redis.call('HSET', k.record, 'budget_window', window, 'budget_spent',
    budget_spent(k.budget_window, k.budget_spent, k.budget_period),
    'budget_reserved', (tonumber(k.budget_reserved) or 0) + cost)
end
redis.call('HSET', rk, 'reply', cjson.encode(reply), 'slot', cap > 0 and '1' or '0', 'budgeted', budget and '1' or '0',
  unpack(rsv))
redis.call('ZADD', KEYS[3], now + tonumber(ARGV[6]), ARGV[1])
return reply
""", batch=RECONCILE_BATCH, expired=Status.EXPIRED.value)

AUTHENTICATE_LUA = lua.script(lua.CLOCK, lua.ACTIVE_KEY, """
local k = active_key(KEYS[1])
if not k then return false end
return {k.account, k.models or ''}
""")

# `GET /v1/credits`: the key's account, its balance and what in-flight requests hold, read in one trip.
CREDITS_LUA = lua.script(lua.CLOCK, lua.ACTIVE_KEY, """
local k = active_key(KEYS[1])
if not k then return false end
local a = redis.call('HMGET', '$account_prefix' .. k.account, 'balance', 'reserved')
return {k.account, a[1] or '0', a[2] or '0'}
""")

INVALID_KEY = "Invalid API key: the key is unknown, expired or revoked."


class PriceRates(Protocol):
    """A model's prices in micro-dollars per million tokens (`config.service.Prices` is one)."""

    @property
    def input_micros(self) -> int: ...

    @property
    def output_micros(self) -> int: ...


@dataclass(slots=True)
class Admission:
    completion_id: str
    request_id: str
    account: str
    key_id: str
    reserved_micros: int
    limits: LimitState
    guard: str | None = None
    model: str = ""
    input_micros: int = 0  # the prices it was admitted at, for a settlement that arrives after reconciliation
    output_micros: int = 0
    delivered: Usage | None = None  # what a stream's client has received so far (the lease checkpoints it)


def unreachable(detail: str = "; requests are refused rather than served unmetered") -> ApiError:
    return ApiError(Code.SERVICE_UNAVAILABLE, f"The accounting store is unreachable{detail}. Retry shortly.",
                    headers={"Retry-After": "5"})


class Admitter:
    def __init__(self, redis, default_rpm: int, default_tpm: int, reservation_ttl_s: float,
                 default_concurrency: int = 0):
        self.redis = redis
        self.default_rpm = default_rpm
        self.default_tpm = default_tpm
        self.default_concurrency = default_concurrency
        self.ttl_ms = int(reservation_ttl_s * 1000)
        self._script = redis.register_script(ADMIT_LUA)
        self._authenticate = redis.register_script(AUTHENTICATE_LUA)
        self._credits = redis.register_script(CREDITS_LUA)

    async def admit(self, key_hash: str, completion_id: str, request_id: str, model: str, prices: PriceRates,
                    prompt_tokens: int, max_completion_tokens: int, safety_model: bool = False) -> Admission:
        """`completion_id` is unique and keys the reservation; `request_id` (x-request-id) goes to the ledger;
        a `safety_model` is served only to keys allowed to call the guard models."""
        args = [completion_id, prompt_tokens, max_completion_tokens, prices.input_micros, prices.output_micros,
                self.ttl_ms, self.default_rpm, self.default_tpm, model, request_id, "1" if safety_model else "0",
                self.default_concurrency]
        try:
            res = await self._script(keys=[keyspace.key_record(key_hash), keyspace.LEDGER,
                                           keyspace.RESERVATION_EXPIRY], args=args)
        except Exception as exc:
            log.error("admission failed, refusing the request: %r", exc)
            raise unreachable() from None
        verdict = res[0]
        if verdict == "ok":
            _, account, key_id, cost, *limits, guard = res
            return Admission(completion_id, request_id, account, key_id, int(cost), LimitState.from_script(limits),
                             guard or None, model, prices.input_micros, prices.output_micros)
        if verdict == "invalid_api_key":
            raise ApiError(Code.INVALID_API_KEY, INVALID_KEY)
        if verdict == "safety_model":
            raise ApiError(Code.MODEL_NOT_FOUND, f"The model '{model}' is a safety model and this key may not call "
                           "it directly (keys are allowed with `qbt keys create --safety-models`).", "model")
        if verdict == "model_not_allowed":
            raise ApiError(Code.MODEL_NOT_FOUND, f"The model '{model}' does not exist or this key may not use it.",
                           "model")
        if verdict == "budget_exceeded":
            needed, left, budget = (units.micros_to_usd(v) for v in res[1:4])
            period = res[4]
            span = "in total" if period == "total" else f"per {period} (UTC)"
            raise ApiError(Code.INSUFFICIENT_FUNDS,
                           f"This key's budget is spent: it may spend ${budget} {span}, ${left} is left, and this "
                           f"request may cost up to ${needed}.",
                           detail={"needed_usd": needed, "available_usd": left, "budget_usd": budget,
                                   "budget_period": period})
        if verdict == "insufficient_funds":
            needed, available = (units.micros_to_usd(v) for v in res[1:3])
            raise ApiError(Code.INSUFFICIENT_FUNDS,
                           f"Insufficient funds: this request may cost up to ${needed} (prompt plus max_tokens "
                           f"at the model's prices) and the account has ${available} available.",
                           detail={"needed_usd": needed, "available_usd": available})
        raise rate_limit_error(res[1:])

    async def authenticate(self, key_hash: str) -> str:
        """Key -> account, for endpoints that are authenticated but not metered (`GET /v1/models`)."""
        return (await self.key_access(key_hash)).account

    async def key_access(self, key_hash: str) -> KeyAccess:
        account, models = await self._by_key(self._authenticate, key_hash)
        return KeyAccess(str(account), frozenset(str(models).split(",")) if models else None)

    async def credits(self, key_hash: str) -> Credits:
        account, balance, reserved = (str(v) for v in await self._by_key(self._credits, key_hash))
        return Credits(account, int(balance), int(reserved))

    @staticmethod
    async def _by_key(script, key_hash: str):
        """A read-only script over an active key's record: 503 if Redis is unreachable, 401 if the key is not."""
        try:
            found = await script(keys=[keyspace.key_record(key_hash)])
        except Exception:
            raise unreachable("") from None
        if not found:
            raise ApiError(Code.INVALID_API_KEY, INVALID_KEY)
        return found


@dataclass(frozen=True, slots=True)
class KeyAccess:
    """Whose key it is and which models it may call (None: every model)."""

    account: str
    models: frozenset[str] | None = None

    def allows(self, model: str) -> bool:
        return self.models is None or model in self.models


@dataclass(frozen=True, slots=True)
class Credits:
    """An account's money as `GET /v1/credits` shows it: decimal strings, as the ledger keeps them."""

    account: str
    balance_micros: int
    reserved_micros: int

    def as_dict(self) -> dict[str, str]:
        return {"object": "credits", "account": self.account,
                "balance_usd": units.micros_to_usd(self.balance_micros),
                "reserved_usd": units.micros_to_usd(self.reserved_micros),
                "available_usd": units.micros_to_usd(self.balance_micros - self.reserved_micros)}


def key_is_active(redis, key_hash: str) -> bool:
    """The same rule as admission's, for synchronous callers (the launcher's dev key)."""
    return bool(redis.register_script(AUTHENTICATE_LUA)(keys=[keyspace.key_record(key_hash)]))
