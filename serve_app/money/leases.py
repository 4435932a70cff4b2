"""Reservations held while their requests run: each ingress renews the deadlines of all its in-flight reservations in
one script call every third of the reservation lifetime, so that a long request is never reconciled as expired (and
its funds released to the next request) while it is still running. Nothing per token, one timer per ingress."""

from __future__ import annotations

import asyncio
import logging

from serve_app.money import keyspace, lua

log = logging.getLogger("qbt.leases")

RENEW_LUA = lua.script(lua.CLOCK, """
local deadline = now + tonumber(ARGV[1])
for i = 2, #ARGV do redis.call('ZADD', KEYS[1], 'XX', deadline, ARGV[i]) end
return #ARGV - 1
""")


class Leases:
    def __init__(self, redis, reservation_ttl_s: float):
        self.ttl_ms = int(reservation_ttl_s * 1000)
        self.interval_s = reservation_ttl_s / 3
        self.held: set[str] = set()
        self._renew = redis.register_script(RENEW_LUA)
        self._task: asyncio.Task | None = None

    def hold(self, completion_id: str) -> None:
        self.held.add(completion_id)
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._keep(), name="qbt-leases")

    def release(self, completion_id: str) -> None:
        self.held.discard(completion_id)

    async def renew(self) -> None:
        if self.held:
            await self._renew(keys=[keyspace.RESERVATION_EXPIRY], args=[self.ttl_ms, *self.held])

    async def _keep(self) -> None:
        """Runs while anything is held; a failed renewal is retried at the next interval (the deadline it would
        have moved is still a whole interval and more away)."""
        while self.held:
            await asyncio.sleep(self.interval_s)
            try:
                await self.renew()
            except Exception as exc:
                log.warning("renewing %d reservations failed: %r", len(self.held), exc)
