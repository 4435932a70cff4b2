"""The exporter as a Serve deployment: one replica running `Exporter.run` in a daemon thread, so that Serve restarts
it where it died; `lag` reports the backlog for health and metrics."""

from __future__ import annotations

import asyncio
import threading

from ray import serve

from serve_app.ledger.database import Database, LedgerConfig
from serve_app.ledger.export import Exporter
from serve_app.money import keyspace
from serve_app.telemetry.logs import configure_logging

REPORT_S = 5


@serve.deployment(num_replicas=1, ray_actor_options={"num_cpus": 0.1}, max_ongoing_requests=8)
class LedgerExporter:
    async def __init__(self, ledger: dict, redis_url: str | None = None):
        """`ledger` is a `LedgerConfig`; a relative SQLite path should already be resolved against the repository
        (`LedgerConfig.resolved`), else it is taken relative to the replica's working directory."""
        configure_logging()
        self.config = LedgerConfig.model_validate(ledger)
        self.database = Database.open(self.config)  # connects on first use, inside the thread
        self.exporter = Exporter(keyspace.sync_client(redis_url), self.database, self.config)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.exporter.run, args=(self.stop,), name="qbt-ledger-export",
                                       daemon=True)
        self.thread.start()
        from ray.serve.metrics import Gauge

        self.unexported = Gauge("qbt_ledger_unexported_rows", "Ledger rows in Redis not yet in the database.")
        self.reporter = asyncio.get_running_loop().create_task(self._report())

    async def _report(self) -> None:
        """The export backlog as a gauge, every few seconds (alerting on a stalled export needs no request)."""
        while True:
            try:
                self.unexported.set((await self.lag())["unexported"])
            except Exception:  # Redis away: the exporter logs it; the gauge keeps its last value
                pass
            await asyncio.sleep(REPORT_S)

    async def lag(self) -> dict:
        return await asyncio.to_thread(self.exporter.lag)

    def check_health(self) -> None:
        if not self.thread.is_alive():
            raise RuntimeError("the ledger export thread has stopped")

    def shutdown(self) -> None:
        """Stops the loop after its current batch (within `block_ms` when idle) and closes the database."""
        self.stop.set()
        self.thread.join(timeout=self.config.block_ms / 1000 + 10)
        if not self.thread.is_alive():
            self.database.close()

    def __del__(self) -> None:
        if hasattr(self, "stop"):
            self.shutdown()
