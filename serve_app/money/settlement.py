"""Settlement in ONE Redis round trip: charge actual usage, release the rest of the reservation, refund unused
token-rate, and append the ledger row (a Redis Stream), all in one Lua script. This is where money moves.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

from serve_app.money import keyspace, lua
from serve_app.money.status import Status

log = logging.getLogger("qbt.settlement")

SETTLE_LUA = lua.script(lua.CLOCK, lua.COST, lua.RESERVATION, lua.LEDGER_ROW, """
local r = read_reservation(KEYS[1])
if not r then return {'gone', 0} end
local prompt, completion = tonumber(ARGV[2]), tonumber(ARGV[3])
local reserved = tonumber(r.reserved)
local cost = 0
if ARGV[5] == '1' then
  cost = cost_micros(prompt, completion, tonumber(r.pin), tonumber(r.pout))
  if cost > reserved then cost = reserved end
end
local acct = '$account_prefix' .. r.account
redis.call('HINCRBY', acct, 'reserved', 0 - reserved)
redis.call('HINCRBY', acct, 'balance', 0 - cost)
redis.call('HINCRBY', acct, 'spent', cost)
redis.call('HINCRBY', acct, 'requests', 1)
redis.call('HINCRBY', acct, 'prompt_tokens', prompt)
redis.call('HINCRBY', acct, 'completion_tokens', completion)
local tpm = tonumber(r.tpm) or 0
local unused = tonumber(r.tokens) - prompt - completion
if tpm > 0 and unused > 0 then
  local tat = tonumber(redis.call('HGET', r.keyrec, 'tpm_tat') or '0') or 0
  redis.call('HSET', r.keyrec, 'tpm_tat', tostring(math.max(tat - unused * 60000 / tpm, now)))
end
ledger_row(KEYS[2], ARGV[1], r, prompt, completion, cost, ARGV[4], now)
redis.call('DEL', KEYS[1])
redis.call('ZREM', KEYS[3], ARGV[1])
return {'ok', cost}
""")


@dataclass(slots=True)
class Settlement:
    completion_id: str
    prompt_tokens: int
    completion_tokens: int
    status: Status


class Settler:
    def __init__(self, redis, retries: int = 3):
        self.redis = redis
        self.retries = retries
        self._script = redis.register_script(SETTLE_LUA)

    async def settle(self, s: Settlement) -> int | None:
        """Returns the micro-dollars charged (only endings whose status is charged pay). Retried, since the request
        was already served; if Redis stays away, the reservation expires and admission reconciles it."""
        args = [s.completion_id, s.prompt_tokens, s.completion_tokens, s.status.value, "1" if s.status.charged else "0"]
        keys = [keyspace.reservation(s.completion_id), keyspace.LEDGER, keyspace.RESERVATION_EXPIRY]
        for attempt in range(self.retries):
            try:
                verdict, cost = await self._script(keys=keys, args=args)
                return int(cost) if verdict == "ok" else None
            except Exception as exc:
                log.warning("settlement of %s failed (attempt %d): %s", s.completion_id, attempt + 1, exc)
                await asyncio.sleep(0.2 * 2**attempt)
        log.error("settlement of %s abandoned; its reservation will expire", s.completion_id)
        return None
