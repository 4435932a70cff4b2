"""Settlement in ONE Redis round trip: charge actual usage, release the rest of the reservation, refund unused
token-rate, and append the ledger row (a Redis Stream), all in one Lua script. This is where money moves.

A settlement that finds its reservation already reconciled as expired still charges what was produced (a late row,
never zero); a replay finds it settled and charges nothing. Only dropped connections and timeouts are retried.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

from redis.exceptions import ConnectionError, MasterDownError, OutOfMemoryError, ReadOnlyError, TimeoutError

from serve_app.money import keyspace, lua
from serve_app.money.status import Status

log = logging.getLogger("qbt.settlement")

SETTLE_LUA = lua.script(lua.CLOCK, lua.COST, lua.BUDGET, lua.RESERVATION, lua.LEDGER_ROW, """
local prompt, completion = tonumber(ARGV[2]), tonumber(ARGV[3])
if not prompt or not completion then return redis.error_reply('settlement: token counts must be numbers') end
local r, state = read_reservation(KEYS[1])
if state == 'corrupt' then
  set_aside(KEYS[1], ARGV[1])
  redis.call('ZREM', KEYS[3], ARGV[1])
  return {'corrupt', 0}
end
local reserved, before = 0, {0, 0, 0, ''}
if state == 'missing' then
  -- Reconciled as expired while the request ran on: charge the rest of what it produced, late, once. Otherwise a
  -- replay.
  before = read_expired(ARGV[1])
  if not before then return {'gone', 0} end
  r = {account = ARGV[6], key_id = ARGV[7], model = ARGV[8], pin = ARGV[9], pout = ARGV[10],
       request_id = ARGV[11], created = now, tpm = '0', tokens = '0', keyrec = ''}
  if not tonumber(r.pin) or not tonumber(r.pout) then return redis.error_reply('settlement: late prices missing') end
else
  reserved = tonumber(r.reserved)
end
if state == 'ok' then release_slot(KEYS[1]) end
local cost = 0
if ARGV[5] == '1' then
  cost = cost_micros(prompt, completion, tonumber(r.pin), tonumber(r.pout))
  if state == 'ok' and cost > reserved then cost = reserved end
end
-- After a reconciliation that charged part (what was checkpointed), this row carries the rest.
cost = math.max(cost - before[1], 0)
if state == 'ok' then settle_budget(KEYS[1], cost) end
if state == 'missing' and before[4] ~= '' then budget_charge(before[4], 0, cost) end  -- its hold went at expiry
prompt, completion = math.max(prompt - before[2], 0), math.max(completion - before[3], 0)
local acct = '$account_prefix' .. r.account
redis.call('HINCRBY', acct, 'reserved', 0 - reserved)
redis.call('HINCRBY', acct, 'balance', 0 - cost)
redis.call('HINCRBY', acct, 'spent', cost)
if before[3] == 0 then redis.call('HINCRBY', acct, 'requests', 1) end  -- a charged reconciliation counted it
redis.call('HINCRBY', acct, 'prompt_tokens', prompt)
redis.call('HINCRBY', acct, 'completion_tokens', completion)
local tpm = tonumber(r.tpm) or 0
local unused = (tonumber(r.tokens) or 0) - prompt - completion
if tpm > 0 and unused > 0 then
  local tat = tonumber(redis.call('HGET', r.keyrec, 'tpm_tat') or '0') or 0
  redis.call('HSET', r.keyrec, 'tpm_tat', tostring(math.max(tat - unused * 60000 / tpm, now)))
end
ledger_row(KEYS[2], ARGV[1], r, prompt, completion, cost, ARGV[4], now)
redis.call('DEL', KEYS[1])
redis.call('ZREM', KEYS[3], ARGV[1])
if state == 'missing' then
  redis.call('DEL', '$done_prefix' .. ARGV[1])  -- charged once: a replay of this settlement finds nothing
  return {'late', cost}
end
return {'ok', cost}
""")


@dataclass(slots=True)
class Settlement:
    completion_id: str
    prompt_tokens: int
    completion_tokens: int
    status: Status
    # What a late settlement (after the reservation was reconciled as expired) needs to charge on its own.
    account: str = ""
    key_id: str = ""
    model: str = ""
    input_micros: int = 0
    output_micros: int = 0
    request_id: str = ""


# Never a script error (a script that failed may have run in part); but a Redis that refuses the script before its
# first write (a failover's read-only old master, a full memory, no master) is retried, as a dropped connection.
RETRIED = (ConnectionError, TimeoutError, ReadOnlyError, OutOfMemoryError, MasterDownError)


class Settler:
    def __init__(self, redis, retry_s: float = 600, backoff_cap_s: float = 2.0):
        self.redis = redis
        self.retry_s = retry_s
        self.backoff_cap_s = backoff_cap_s
        self._script = redis.register_script(SETTLE_LUA)

    async def settle(self, s: Settlement) -> int | None:
        """Returns the micro-dollars charged (only endings whose status is charged pay). The request was already
        served, so a settlement outlasts a Redis outage: retried with backoff for up to `retry_s` (the reservation's
        lease is held meanwhile, and a settlement that lands after the reservation expired is still charged)."""
        args = [s.completion_id, s.prompt_tokens, s.completion_tokens, s.status.value, "1" if s.status.charged else "0",
                s.account, s.key_id, s.model, s.input_micros, s.output_micros, s.request_id]
        keys = [keyspace.reservation(s.completion_id), keyspace.LEDGER, keyspace.RESERVATION_EXPIRY]
        loop = asyncio.get_running_loop()
        give_up, attempt = loop.time() + self.retry_s, 0
        while True:
            try:
                verdict, cost = await self._script(keys=keys, args=args)
            except RETRIED as exc:
                attempt += 1
                if loop.time() >= give_up:
                    break
                if attempt == 1 or attempt % 10 == 0:
                    log.warning("settlement of %s failed (attempt %d), retrying: %s", s.completion_id, attempt, exc)
                await asyncio.sleep(min(self.backoff_cap_s, 0.1 * 2 ** min(attempt, 10)))
                continue
            except Exception as exc:
                log.error("settlement of %s refused by Redis, not retried: %r", s.completion_id, exc)
                return None
            if verdict == "late":
                log.warning("settlement of %s arrived after its reservation expired; charged late", s.completion_id)
            elif verdict == "corrupt":
                log.error("the reservation of %s was corrupt and was set aside (qbt:rsv:corrupt:)", s.completion_id)
            return int(cost) if verdict in ("ok", "late") else None
        log.error("settlement of %s abandoned after %.0f s; its reservation will expire", s.completion_id,
                  self.retry_s)
        return None
