"""The money rules, written once, in the Lua that runs them: the clock, the cost formula, the key check, the
reservation's fields and the ledger row. Both scripts (admission, settlement) are assembled from these fragments
when they load; the Redis tier tests run the fragments themselves, never a Python copy."""

from __future__ import annotations

from string import Template

from serve_app.money import keyspace

# Redis's own clock in milliseconds: limits and deadlines never depend on the ingress hosts' clocks.
CLOCK = """
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
"""

# What a request costs: prices are micro-dollars per million tokens; rounded up to the micro-dollar.
COST = """
local function cost_micros(prompt, completion, pin, pout)
  return math.floor((prompt * pin + completion * pout + 999999) / 1000000)
end
"""

# A key is valid while its record exists, it is not revoked and not past its expiry; a secret replaced by a rotation
# is a small record (`alias_of` the key's record) valid until its grace ends (`secret_expires_ms`). Everything else
# (limits, budget, state) lives in the key's one record, so both secrets of a rotation share it. Needs CLOCK.
KEY_FIELDS = ("account", "key_id", "revoked", "rpm", "tpm", "rpm_tat", "tpm_tat", "guard", "safety_models",
              "concurrency", "inflight", "expires_ms", "budget_micros", "budget_period", "budget_window",
              "budget_spent", "budget_reserved", "models")
ACTIVE_KEY = """
local function active_key(secret)
  local s = redis.call('HMGET', secret, 'alias_of', 'secret_expires_ms')
  if s[2] and (tonumber(s[2]) or 0) <= now then return nil end
  local record = s[1] or secret
  local k = redis.call('HMGET', record, $key_fields)
  if not k[1] or k[3] == '1' then return nil end
  if k[12] and (tonumber(k[12]) or 0) <= now then return nil end
  return {record = record, account = k[1], key_id = k[2], rpm = k[4], tpm = k[5], rpm_tat = k[6], tpm_tat = k[7],
          guard = k[8], safety_models = k[9], concurrency = k[10], inflight = k[11], expires_ms = k[12],
          budget = k[13], budget_period = k[14], budget_window = k[15], budget_spent = k[16],
          budget_reserved = k[17], models = k[18]}
end
"""

# A key's budget: micro-dollars per period (`day`, `week` from Monday, `month`, all UTC; `total`: never resets).
# The period is computed from Redis's clock when a request is admitted or settled: no scheduler, no reset job.
# Admission holds the worst case in `budget_reserved`; settlement moves what was charged into `budget_spent`.
BUDGET = """
local DAY_MS = 86400000
local function period_start(period, t)
  local day = math.floor(t / DAY_MS)
  if period == 'day' then return day * DAY_MS end
  if period == 'week' then return (day - (day + 3) % 7) * DAY_MS end  -- 1970-01-01 was a Thursday
  if period == 'month' then  -- the day of the month, from the civil calendar (H. Hinnant's days_from_civil inverse)
    local z = day + 719468
    local era = math.floor(z / 146097)
    local doe = z - era * 146097
    local yoe = math.floor((doe - math.floor(doe / 1460) + math.floor(doe / 36524) - math.floor(doe / 146096)) / 365)
    local doy = doe - (365 * yoe + math.floor(yoe / 4) - math.floor(yoe / 100))
    local mp = math.floor((5 * doy + 2) / 153)
    return (day - (doy - math.floor((153 * mp + 2) / 5))) * DAY_MS
  end
  return 0
end

-- What the key has spent in the current period (0 once a new period has begun).
local function budget_spent(window, spent, period)
  if (tonumber(window) or -1) ~= period_start(period or 'total', now) then return 0 end
  return tonumber(spent) or 0
end

-- A request of a budgeted key ends: its hold is released and its charge counted in the period of the settlement.
local function budget_charge(keyrec, held, charged)
  local k = redis.call('HMGET', keyrec, 'budget_reserved', 'budget_period', 'budget_window', 'budget_spent')
  if not k[2] then return end  -- the key is gone
  held = math.min(held, tonumber(k[1]) or 0)
  redis.call('HSET', keyrec, 'budget_reserved', (tonumber(k[1]) or 0) - held,
    'budget_window', period_start(k[2], now), 'budget_spent', budget_spent(k[3], k[4], k[2]) + charged)
end

-- The key record a budgeted reservation counts against, or '' (also kept in an expired reservation's marker, so
-- that a late settlement counts its rest against the budget too).
local function budget_record(rk)
  local b = redis.call('HMGET', rk, 'budgeted', 'keyrec')
  if b[1] == '1' and b[2] then return b[2] end
  return ''
end

local function settle_budget(rk, charged)
  local keyrec = budget_record(rk)
  if keyrec ~= '' then budget_charge(keyrec, tonumber(redis.call('HGET', rk, 'reserved')) or 0, charged) end
end
"""

# The reservation admission writes (needs BUDGET before it) (`reservation_args`: all fields or a script error before any write) and
# settlement and reconciliation read (`read_reservation`, validating every field before any write), by field name.
RESERVATION_FIELDS = ("account", "key_id", "reserved", "tokens", "model", "created", "keyrec", "pin", "pout", "tpm",
                      "request_id")
RESERVATION = """
local function reservation_args(r)
  local args = {}
  for _, name in ipairs({$reservation_fields}) do
    if r[name] == nil then error('reservation field missing: ' .. name) end
    table.insert(args, name)
    table.insert(args, r[name])
  end
  return args
end

local NUMERIC = {reserved = true, tokens = true, created = true, pin = true, pout = true, tpm = true}

-- (fields, 'ok'), or (nil, 'missing') when there is no such reservation, or (nil, 'corrupt') when a field is
-- missing or not a number: a corrupt one is set aside by the caller, never read half-way.
local function read_reservation(rk)
  local names = {$reservation_fields}
  local values = redis.call('HMGET', rk, unpack(names))
  local r, found, broken = {}, false, false
  for i, name in ipairs(names) do
    local v = values[i]
    if v then found = true else broken = true end
    if v and NUMERIC[name] and not tonumber(v) then broken = true end
    r[name] = v
  end
  if not found then return nil, 'missing' end
  if broken then return nil, 'corrupt' end
  return r, 'ok'
end

-- A reservation that took one of its key's concurrent-request slots gives it back (settled, reconciled or set
-- aside: whatever ends it), so a slot cannot leak when an ingress dies.
local function release_slot(rk)
  local s = redis.call('HMGET', rk, 'slot', 'keyrec')
  if s[1] == '1' and s[2] and (tonumber(redis.call('HGET', s[2], 'inflight')) or 0) > 0 then
    redis.call('HINCRBY', s[2], 'inflight', -1)
  end
end

-- A corrupt reservation moves aside for the operator (`qbt:rsv:corrupt:<id>`, counted in `qbt:stats`).
local function set_aside(rk, rid)
  release_slot(rk)
  settle_budget(rk, 0)
  redis.call('RENAME', rk, '$corrupt_prefix' .. rid)
  redis.call('HINCRBY', '$stats', 'corrupt_reservations', 1)
end

-- What the client of a stream had received at the last checkpoint (written by the ingress's lease renewal): what
-- a reconciliation charges when the ingress died with the request.
local function delivered(rk)
  local d = redis.call('HMGET', rk, 'delivered_prompt', 'delivered')
  local prompt, completion = tonumber(d[1]) or 0, tonumber(d[2]) or 0
  if prompt < 0 or completion < 0 or math.floor(prompt) ~= prompt or math.floor(completion) ~= completion then
    return 0, 0  -- not a count the lease wrote: nothing checkpointed (and nothing that could fail a write)
  end
  if completion == 0 then return 0, 0 end  -- nothing received yet: nothing to charge, nothing to carry over
  return prompt, completion
end

-- A reservation reconciled as expired leaves a marker for a day, with what the reconciliation charged: the
-- settlement that arrives after it charges the rest, late, once (it deletes the marker).
local function mark_expired(rid, charged, prompt, completion, keyrec)
  redis.call('SET', '$done_prefix' .. rid, cjson.encode({charged, prompt, completion, keyrec}), 'EX', 86400)
end

-- (charged, prompt, completion, budgeted key record or '') of a marker, or nil when there is none ('expired' is a
-- marker of an older release).
local function read_expired(rid)
  local marker = redis.call('GET', '$done_prefix' .. rid)
  if not marker then return nil end
  if marker == 'expired' then return {0, 0, 0, ''} end
  local ok, v = pcall(cjson.decode, marker)
  if not ok or type(v) ~= 'table' or not tonumber(v[1]) or not tonumber(v[2]) or not tonumber(v[3]) then
    return {0, 0, 0, ''}
  end
  return {tonumber(v[1]), tonumber(v[2]), tonumber(v[3]), type(v[4]) == 'string' and v[4] or ''}
end
"""

# One ledger row per admitted request, whatever its ending.
LEDGER_FIELDS = ("request_id", "completion_id", "account", "key_id", "model", "prompt_tokens", "completion_tokens",
                 "cost_micros", "status", "created_ms", "settled_ms")
# Every operator change, appended in the same script as the change: who, what, before, after, when, request id.
# Snapshots leave out what moves on every request (rate-limit state, in-flight counts) and the secrets' records.
AUDIT = """
local VOLATILE = {rpm_tat = true, tpm_tat = true, inflight = true, current_secret = true, budget_reserved = true}
local function snapshot(key)
  local flat = redis.call('HGETALL', key)
  if #flat == 0 then return 'null' end
  local t = {}
  for i = 1, #flat, 2 do
    if not VOLATILE[flat[i]] then t[flat[i]] = flat[i + 1] end
  end
  return cjson.encode(t)
end
local function audit(actor, action, target, before, after, request_id)
  redis.call('XADD', '$audit', '*', 'at_ms', now, 'actor', actor, 'action', action, 'target', target,
    'before', before, 'after', after, 'request_id', request_id)
end
"""

LEDGER_ROW = """
local function ledger_row(ledger, completion_id, r, prompt, completion, cost, status, now)
  redis.call('XADD', ledger, '*', 'request_id', r.request_id, 'completion_id', completion_id, 'account', r.account,
    'key_id', r.key_id, 'model', r.model, 'prompt_tokens', prompt, 'completion_tokens', completion,
    'cost_micros', cost, 'status', status, 'created_ms', r.created, 'settled_ms', now)
end
"""



def _quoted(names: tuple[str, ...]) -> str:
    return ", ".join(f"'{n}'" for n in names)


SUBSTITUTIONS = {"key_fields": _quoted(KEY_FIELDS), "reservation_fields": _quoted(RESERVATION_FIELDS),
                 "account_prefix": keyspace.ACCOUNT_PREFIX, "reservation_prefix": keyspace.RESERVATION_PREFIX,
                 "corrupt_prefix": keyspace.CORRUPT_PREFIX, "done_prefix": keyspace.DONE_PREFIX,
                 "stats": keyspace.STATS, "audit": keyspace.AUDIT}


def script(*parts: str, **values) -> str:
    """A script from fragments and its own body; `$name` placeholders take the keyspace's prefixes, the field
    lists and the given values."""
    return Template("\n".join(parts)).substitute(SUBSTITUTIONS, **values)
