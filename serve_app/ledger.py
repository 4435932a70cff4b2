"""Settlement in ONE Redis round trip: charge actual usage, release the rest of the reservation, refund unused
token-rate, and append the ledger row (a Redis Stream), all in one Lua script. This is where money moves.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from datetime import datetime, timezone

from serve_app import store

log = logging.getLogger("qbt.ledger")

SETTLE_LUA = """
local r = redis.call('HMGET', KEYS[1], 'account', 'reserved', 'key_id', 'model', 'created', 'keyrec', 'tokens',
  'pin', 'pout', 'tpm', 'request_id')
if not r[1] then return {'gone', 0} end
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
local prompt, completion = tonumber(ARGV[2]), tonumber(ARGV[3])
local reserved = tonumber(r[2])
local cost = 0
if ARGV[5] == '1' then
  cost = math.floor((prompt * tonumber(r[8]) + completion * tonumber(r[9]) + 999999) / 1000000)
  if cost > reserved then cost = reserved end
end
local acct = '%(prefix)s:acct:' .. r[1]
redis.call('HINCRBY', acct, 'reserved', 0 - reserved)
redis.call('HINCRBY', acct, 'balance', 0 - cost)
redis.call('HINCRBY', acct, 'spent', cost)
redis.call('HINCRBY', acct, 'requests', 1)
redis.call('HINCRBY', acct, 'prompt_tokens', prompt)
redis.call('HINCRBY', acct, 'completion_tokens', completion)
local tpm = tonumber(r[10]) or 0
local unused = tonumber(r[7]) - prompt - completion
if tpm > 0 and unused > 0 then
  local tat = tonumber(redis.call('HGET', r[6], 'tpm_tat') or '0') or 0
  redis.call('HSET', r[6], 'tpm_tat', tostring(math.max(tat - unused * 60000 / tpm, now)))
end
redis.call('XADD', KEYS[2], '*', 'request_id', r[11], 'completion_id', ARGV[1], 'account', r[1],
  'key_id', r[3], 'model', r[4],
  'prompt_tokens', prompt, 'completion_tokens', completion, 'cost_micros', cost, 'status', ARGV[4],
  'created_ms', r[5], 'settled_ms', now)
redis.call('DEL', KEYS[1])
redis.call('ZREM', KEYS[3], ARGV[1])
return {'ok', cost}
""" % {"prefix": store.PREFIX}


@dataclass(slots=True)
class Settlement:
    completion_id: str
    prompt_tokens: int
    completion_tokens: int
    status: str
    charge: bool = True


class Ledger:
    def __init__(self, redis, retries: int = 3):
        self.redis = redis
        self.retries = retries
        self._script = redis.register_script(SETTLE_LUA)

    async def settle(self, s: Settlement) -> int | None:
        """Returns the micro-dollars charged. Retried, since the request was already served; if Redis stays
        away, the reservation expires and the admission script reconciles it (charging nothing)."""
        args = [s.completion_id, s.prompt_tokens, s.completion_tokens, s.status, "1" if s.charge else "0"]
        keys = [store.reservation(s.completion_id), store.LEDGER, store.RESERVATION_EXPIRY]
        for attempt in range(self.retries):
            try:
                verdict, cost = await self._script(keys=keys, args=args)
                return int(cost) if verdict == "ok" else None
            except Exception as exc:
                log.warning("settlement of %s failed (attempt %d): %s", s.completion_id, attempt + 1, exc)
                await asyncio.sleep(0.2 * 2**attempt)
        log.error("settlement of %s abandoned; its reservation will expire", s.completion_id)
        return None


def ledger_rows(redis, account: str, since: datetime | None = None, batch: int = 1000):
    """Ledger rows of one account, oldest first, as dicts with exact decimal `cost_usd` (sync client, for the CLI)."""
    start = f"{int(since.timestamp() * 1000)}-0" if since else "-"
    while True:
        entries = redis.xrange(store.LEDGER, min=start, max="+", count=batch)
        for entry_id, fields in entries:
            if fields.get("account") == account:
                yield row(entry_id, fields)
        if len(entries) < batch:
            return
        start = "(" + entries[-1][0]


def row(entry_id: str, f: dict) -> dict:
    def iso(ms: str) -> str:
        return datetime.fromtimestamp(int(ms) / 1000, tz=timezone.utc).isoformat(timespec="milliseconds")

    return {"request_id": f["request_id"], "completion_id": f["completion_id"], "model": f["model"], "key_id": f["key_id"],
            "prompt_tokens": int(f["prompt_tokens"]), "completion_tokens": int(f["completion_tokens"]),
            "cost_usd": store.micros_to_usd(f["cost_micros"]), "cost_micros": int(f["cost_micros"]),
            "status": f["status"], "created_at": iso(f["created_ms"]), "settled_at": iso(f["settled_ms"]),
            "ledger_id": entry_id}
