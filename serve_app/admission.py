"""Admission in ONE Redis round trip: authenticate the key, check its rate limits, reserve the worst-case cost.

The script is idempotent per completion id (a replay returns the stored reply), so the client may retry it after a
dropped connection without reserving twice. Time is Redis's own clock (`TIME`), so limits do not depend on the clocks of the ingress hosts or on the order in
which concurrent scripts run. The script also reconciles a few expired reservations on each call (left by an ingress that died mid-request), so
that no reservation stays stuck without a separate sweeper process. Everything happens in one Lua script, so any
number of ingress replicas stay exact.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from serve_app import store
from serve_app.errors import ApiError, Code
from serve_app.limits import LimitState, rate_limit_error

log = logging.getLogger("qbt.admission")

RECONCILE_BATCH = 8

ADMIT_LUA = """
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
local expired = redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', now, 'LIMIT', 0, %(batch)d)
for _, rid in ipairs(expired) do
  local rk = '%(prefix)s:rsv:' .. rid
  local r = redis.call('HMGET', rk, 'account', 'reserved', 'key_id', 'model', 'created', 'request_id')
  if r[1] then
    redis.call('HINCRBY', '%(prefix)s:acct:' .. r[1], 'reserved', 0 - tonumber(r[2]))
    redis.call('XADD', KEYS[2], '*', 'request_id', r[6], 'completion_id', rid, 'account', r[1], 'key_id', r[3],
      'model', r[4],
      'prompt_tokens', 0, 'completion_tokens', 0, 'cost_micros', 0, 'status', 'expired',
      'created_ms', r[5], 'settled_ms', now)
    redis.call('DEL', rk)
  end
  redis.call('ZREM', KEYS[3], rid)
end

local rk = '%(prefix)s:rsv:' .. ARGV[1]
local replayed = redis.call('HGET', rk, 'reply')
if replayed then return cjson.decode(replayed) end

local k = redis.call('HMGET', KEYS[1], 'account', 'key_id', 'revoked', 'rpm', 'tpm', 'rpm_tat', 'tpm_tat', 'guard')
if not k[1] or k[3] == '1' then return {'invalid_api_key'} end
local acct = '%(prefix)s:acct:' .. k[1]
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

local rpm = tonumber(k[4]) or tonumber(ARGV[7])
local tpm = tonumber(k[5]) or tonumber(ARGV[8])
local r_ok, r_rem, r_reset, r_tat = gcra(rpm, k[6], 1)
local t_ok, t_rem, t_reset, t_tat = gcra(tpm, k[7], tokens)
if r_ok == 0 then return {'rate_limit_exceeded', 'requests', rpm, r_rem, r_reset, tpm, t_rem, t_reset} end
if t_ok == 0 then
  if tpm > 0 and tokens > tpm then return {'rate_limit_exceeded', 'tokens_over', tpm, tokens, 0, rpm, r_rem, 0} end
  return {'rate_limit_exceeded', 'tokens', rpm, r_rem, r_reset, tpm, t_rem, t_reset}
end

local pin, pout = tonumber(ARGV[4]), tonumber(ARGV[5])
local cost = math.floor((prompt * pin + completion * pout + 999999) / 1000000)
local a = redis.call('HMGET', acct, 'balance', 'reserved')
if not a[1] then return {'invalid_api_key'} end
local available = tonumber(a[1]) - (tonumber(a[2]) or 0)
if cost > available then return {'insufficient_funds', cost, available} end

if rpm > 0 then redis.call('HSET', KEYS[1], 'rpm_tat', tostring(r_tat)) end
if tpm > 0 then redis.call('HSET', KEYS[1], 'tpm_tat', tostring(t_tat)) end
redis.call('HINCRBY', acct, 'reserved', cost)
local reply = {'ok', k[1], k[2], cost, rpm, r_rem, r_reset, tpm, t_rem, t_reset, k[8] or ''}
redis.call('HSET', rk, 'account', k[1], 'key_id', k[2], 'reserved', cost, 'tokens', tokens,
  'model', ARGV[9], 'created', now, 'keyrec', KEYS[1], 'pin', pin, 'pout', pout, 'tpm', tpm,
  'request_id', ARGV[10], 'reply', cjson.encode(reply))
redis.call('ZADD', KEYS[3], now + tonumber(ARGV[6]), ARGV[1])
return reply
""" % {"prefix": store.PREFIX, "batch": RECONCILE_BATCH}


@dataclass(slots=True)
class Admission:
    completion_id: str
    request_id: str
    account: str
    key_id: str
    reserved_micros: int
    limits: LimitState
    guard: str | None = None


@dataclass(slots=True)
class Prices:
    input_micros_per_mtok: int
    output_micros_per_mtok: int


class Admitter:
    def __init__(self, redis, default_rpm: int, default_tpm: int, reservation_ttl_s: float):
        self.redis = redis
        self.default_rpm = default_rpm
        self.default_tpm = default_tpm
        self.ttl_ms = int(reservation_ttl_s * 1000)
        self._script = redis.register_script(ADMIT_LUA)

    async def admit(self, key_hash: str, completion_id: str, request_id: str, model: str, prices: Prices,
                    prompt_tokens: int, max_completion_tokens: int) -> Admission:
        """`completion_id` is unique and keys the reservation; `request_id` (x-request-id) goes to the ledger."""
        args = [completion_id, prompt_tokens, max_completion_tokens,
                prices.input_micros_per_mtok, prices.output_micros_per_mtok, self.ttl_ms, self.default_rpm,
                self.default_tpm, model, request_id]
        try:
            res = await self._script(keys=[store.key_record(key_hash), store.LEDGER, store.RESERVATION_EXPIRY],
                                     args=args)
        except Exception as exc:
            log.error("admission failed, refusing the request: %r", exc)
            raise ApiError(Code.SERVICE_UNAVAILABLE,
                           "The accounting store is unreachable; requests are refused rather than served "
                           "unmetered. Retry shortly.", headers={"Retry-After": "5"}) from None
        verdict = res[0]
        if verdict == "ok":
            _, account, key_id, cost, *limits, guard = res
            return Admission(completion_id, request_id, account, key_id, int(cost), LimitState.from_script(limits),
                             guard or None)
        if verdict == "invalid_api_key":
            raise ApiError(Code.INVALID_API_KEY, "Invalid API key: the key is unknown or has been revoked.")
        if verdict == "insufficient_funds":
            needed, available = (store.micros_to_usd(v) for v in res[1:3])
            raise ApiError(Code.INSUFFICIENT_FUNDS,
                           f"Insufficient funds: this request may cost up to ${needed} (prompt plus max_tokens "
                           f"at the model's prices) and the account has ${available} available.")
        raise rate_limit_error(res[1:])

    async def authenticate(self, key_hash: str) -> str:
        """Key -> account, for endpoints that are authenticated but not metered (`GET /v1/models`)."""
        try:
            account, revoked = await self.redis.hmget(store.key_record(key_hash), "account", "revoked")
        except Exception:
            raise ApiError(Code.SERVICE_UNAVAILABLE, "The accounting store is unreachable. Retry shortly.",
                           headers={"Retry-After": "5"}) from None
        if not account or revoked == "1":
            raise ApiError(Code.INVALID_API_KEY, "Invalid API key: the key is unknown or has been revoked.")
        return account
