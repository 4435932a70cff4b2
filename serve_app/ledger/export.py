"""Moves the ledger out of Redis. The settlement scripts append one row per request to the stream `qbt:ledger`, which
is only a buffer: the exporter reads it as the consumer group `qbt-exporter`, inserts each batch into the database in
one transaction (idempotent by ledger id), then acknowledges it, then trims the stream. Delivery is at-least-once and
the insert ignores a ledger id it already holds, so a crash at any point loses nothing and duplicates nothing: what
was read but not acknowledged stays pending, and is read again by this consumer or claimed by the next one."""

from __future__ import annotations

import logging
import os
import socket
import sqlite3
import threading

from redis.exceptions import RedisError, ResponseError

from serve_app.ledger.database import Database, LedgerConfig, MalformedRow, Reject, parse_entry
from serve_app.money.keyspace import LEDGER
from serve_app.money.status import Status

# The consumer group. Defined here, not in `money/keyspace.py`: only the exporter reads the stream through it.
GROUP = "qbt-exporter"
MAX_SEQ = 2**64 - 1

log = logging.getLogger("qbt.ledger")


def _transient_errors() -> tuple[type[BaseException], ...]:
    errors: tuple[type[BaseException], ...] = (RedisError, sqlite3.Error, OSError, RuntimeError)
    try:
        import psycopg

        errors += (psycopg.Error,)
    except ImportError:
        pass
    return errors


TRANSIENT = _transient_errors()  # the loop backs off on these; anything else is a bug and ends the thread


def id_key(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


def next_id(entry_id: str) -> str:
    ms, seq = id_key(entry_id)
    return f"{ms}-{seq + 1}" if seq < MAX_SEQ else f"{ms + 1}-0"


class Exporter:
    """One consumer of the group. `export_once` moves at most one batch; `run` loops it until stopped. Several
    exporters (or a restarted one under a new name) share the work safely; one is enough."""

    def __init__(self, redis, database: Database, config: LedgerConfig, consumer: str | None = None):
        self.redis = redis  # sync redis-py client, decode_responses=True
        self.database = database
        self.config = config
        self.consumer = consumer or f"{socket.gethostname()}-{os.getpid()}"
        self.exported = 0  # rows this exporter inserted (new to the database)
        self.rejected = 0  # entries it set aside into the `ledger_rejects` table (durable there, for the operator)
        self.expired = 0  # rows of reservations reconciled as expired among the batches it stored (for the metric)

    def ensure_group(self) -> None:
        try:
            self.redis.xgroup_create(LEDGER, GROUP, id="0", mkstream=True)
        except ResponseError as e:
            if "BUSYGROUP" not in str(e):
                raise

    def export_once(self) -> int:
        """Reads a batch (a dead consumer's entries idle over `claim_idle_ms`, this consumer's own pending ones, then
        new ones, waiting up to `block_ms` when there is nothing else), stores it, acknowledges it and trims the
        stream. Returns how many entries were acknowledged (stored rows and set-aside entries)."""
        try:
            entries = self._read()
        except ResponseError as e:
            if "NOGROUP" not in str(e):
                raise
            log.warning("the ledger stream's consumer group is missing; creating it again")
            self.ensure_group()
            return 0
        if entries:
            rows, rejects = [], []
            for entry_id, fields in entries.items():
                try:
                    rows.append(parse_entry(entry_id, fields))
                except MalformedRow as e:
                    rejects.append(Reject(entry_id, fields, str(e)))
            inserted = self.database.insert(rows, rejects)
            self.redis.xack(LEDGER, GROUP, *entries)
            self.exported += inserted
            self.rejected += len(rejects)
            self.expired += sum(row["status"] == Status.EXPIRED.value for row in rows)
            for reject in rejects:
                log.warning("ledger entry %s set aside in ledger_rejects: %s", reject.ledger_id, reject.reason)
            log.debug("ledger: %d entries acknowledged, %d new rows", len(entries), inserted)
        self.trim()
        return len(entries)

    def _read(self) -> dict[str, dict]:
        batch, entries = self.config.batch, {}
        # A dead consumer's entries become this consumer's pending ones; entries deleted meanwhile are reported apart.
        _, claimed, deleted = self.redis.xautoclaim(LEDGER, GROUP, self.consumer, self.config.claim_idle_ms,
                                                    start_id="0-0", count=batch)
        entries.update((entry_id, {}) for entry_id in deleted)
        for entry_id, fields in self._group_read("0", batch):  # this consumer's pending ones, the claimed included
            entries[entry_id] = fields
        if len(entries) < batch:
            block = self.config.block_ms if not entries and self.config.block_ms else None
            for entry_id, fields in self._group_read(">", batch - len(entries), block):
                entries[entry_id] = fields
        return entries

    def _group_read(self, start: str, count: int, block: int | None = None) -> list[tuple[str, dict]]:
        reply = self.redis.xreadgroup(GROUP, self.consumer, {LEDGER: start}, count=count, block=block)
        if not reply:
            return []
        # A deleted entry still pending reads as an empty field list: `parse_entry` sets it aside.
        return [(entry_id, fields or {}) for entry_id, fields in reply[0][1]]

    def trim(self) -> int:
        """Trims the stream to every entry not yet acknowledged (pending, or not yet delivered, in any group) plus at
        most `retain_rows` acknowledged ones: `XTRIM MINID` (exact) at the smallest of the oldest pending id, the id
        just after the last delivered one, and the first of the newest `retain_rows` entries. Reads the groups before
        their pending entries, so that an entry delivered in between counts as not yet delivered. Returns how many
        entries were removed."""
        try:
            groups = self.redis.xinfo_groups(LEDGER)
        except ResponseError:  # no stream yet
            return 0
        if not any(g["name"] == GROUP for g in groups):
            return 0
        bounds = [next_id(g["last-delivered-id"]) for g in groups]
        for g in groups:
            pending = self.redis.xpending(LEDGER, g["name"])
            if pending["pending"]:
                bounds.append(pending["min"])
        minid = min(bounds, key=id_key)
        if self.config.retain_rows:
            # The retention boundary from the front: the entries beyond `retain_rows` (at most a batch per call, so
            # a trim never reads more than it removes), and the id just after the last of them.
            excess = min(self.redis.xlen(LEDGER) - self.config.retain_rows, self.config.batch)
            if excess <= 0:
                return 0
            oldest = self.redis.xrange(LEDGER, "-", "+", count=excess)
            if not oldest:
                return 0
            minid = min(minid, next_id(oldest[-1][0]), key=id_key)
        return self.redis.xtrim(LEDGER, minid=minid, approximate=False)

    def lag(self) -> dict:
        """For health and metrics: `unexported` (entries not yet acknowledged: pending plus never delivered; the
        stream's length when Redis cannot count the undelivered ones), `pending`, `stream_length`, and this
        exporter's `exported` and `rejected` counts."""
        length = self.redis.xlen(LEDGER)
        try:
            groups = self.redis.xinfo_groups(LEDGER)
        except ResponseError:
            groups = []
        group = next((g for g in groups if g["name"] == GROUP), None)
        pending = group["pending"] if group else 0
        undelivered = group.get("lag") if group else None
        unexported = length if undelivered is None else min(pending + undelivered, length)
        return {"unexported": unexported, "pending": pending, "stream_length": length, "exported": self.exported,
                "rejected": self.rejected}

    def oldest_unexported_ms(self) -> int | None:
        """When (Redis's clock in ms: the entry id's first half) the oldest entry not yet acknowledged was appended:
        the group's oldest pending entry or the first one after its last delivered; None when every entry is
        exported. Acknowledged entries that `retain_rows` keeps are not counted."""
        try:
            groups = self.redis.xinfo_groups(LEDGER)
        except ResponseError:  # no stream yet
            return None
        group = next((g for g in groups if g["name"] == GROUP), None)
        oldest = []
        if group is not None and group["pending"]:
            oldest.append(self.redis.xpending(LEDGER, GROUP)["min"])
        first = self.redis.xrange(LEDGER, next_id(group["last-delivered-id"]) if group else "-", "+", count=1)
        if first:
            oldest.append(first[0][0])
        return min(id_key(entry_id)[0] for entry_id in oldest) if oldest else None

    def export_lag_s(self) -> float:
        """How long the oldest unexported entry has waited, in seconds (0 when there is none), on Redis's clock, the
        one the entry ids are written with: a stalled export shows as a growing age whatever the traffic."""
        oldest = self.oldest_unexported_ms()
        if oldest is None:
            return 0.0
        seconds, micros = self.redis.time()
        return max(seconds + micros / 1e6 - oldest / 1000, 0.0)

    def run(self, stop: threading.Event) -> None:
        """Exports until `stop` is set; on a Redis or database error, logs it and retries with a growing delay (up to
        5 s), so an outage of either delays the export and nothing else. After a partial batch it waits `linger_ms`:
        under load that makes the rows per batch grow with the rate, not the batches per second."""
        delay, ready = 0.0, False
        while not stop.is_set():
            try:
                if not ready:
                    self.ensure_group()
                    ready = True
                moved = self.export_once()
                if delay:
                    log.info("ledger export resumed")
                delay = 0.0
                if 0 < moved < self.config.batch and self.config.linger_ms:
                    stop.wait(self.config.linger_ms / 1000)  # let the next batch gather
            except TRANSIENT as e:
                delay = min(max(delay * 2, 0.1), 5.0)
                log.warning("ledger export failed (%s: %s); retrying in %.1f s", type(e).__name__, e, delay)
                stop.wait(delay)
