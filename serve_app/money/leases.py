"""Reservations held while their requests run. Each ingress, in one script call per tick for all its in-flight
requests: renews their deadlines (every third of the reservation lifetime at least), so that a long request is never
reconciled as expired while it still runs; and checkpoints what each stream's client has received so far, so that if
this ingress dies with its requests, the reconciliation charges what was delivered up to the last tick (what was
delivered after it is the most a crashed ingress can lose). Nothing per token: one timer per ingress."""

from __future__ import annotations

import asyncio
import logging

from serve_app.money import keyspace, lua
from serve_app.money.admission import Admission

log = logging.getLogger("qbt.leases")

RENEW_LUA = lua.script(lua.CLOCK, """
local deadline = now + tonumber(ARGV[1])
local held = 0
for i = 2, #ARGV, 3 do
  local rid, prompt, completion = ARGV[i], ARGV[i + 1], ARGV[i + 2]
  redis.call('ZADD', KEYS[1], 'XX', deadline, rid)
  if completion ~= '0' then
    local rk = '$reservation_prefix' .. rid
    if redis.call('EXISTS', rk) == 1 then
      redis.call('HSET', rk, 'delivered_prompt', prompt, 'delivered', completion)
    end
  end
  held = held + 1
end
return held
""")


class Leases:
    def __init__(self, redis, reservation_ttl_s: float, checkpoint_s: float = 2.0):
        self.ttl_ms = int(reservation_ttl_s * 1000)
        self.interval_s = min(reservation_ttl_s / 3, checkpoint_s)
        self.held: dict[str, Admission] = {}
        self._renew = redis.register_script(RENEW_LUA)
        self._task: asyncio.Task | None = None

    def hold(self, admission: Admission) -> None:
        self.held[admission.completion_id] = admission
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._keep(), name="qbt-leases")

    def release(self, completion_id: str) -> None:
        self.held.pop(completion_id, None)

    async def renew(self) -> None:
        if not self.held:
            return
        args: list = [self.ttl_ms]
        for completion_id, admission in list(self.held.items()):
            d = admission.delivered
            args += [completion_id, d.prompt_tokens, d.completion_tokens] if d is not None else [completion_id, 0, 0]
        await self._renew(keys=[keyspace.RESERVATION_EXPIRY], args=args)

    async def _keep(self) -> None:
        """Runs while anything is held; a failed renewal is retried at the next tick (the deadline it would have
        moved is still two ticks and more away)."""
        while self.held:
            await asyncio.sleep(self.interval_s)
            try:
                await self.renew()
            except Exception as exc:
                log.warning("renewing %d reservations failed: %r", len(self.held), exc)
