"""The exporter as a Serve deployment: one replica running `Exporter.run` in a daemon thread, so that Serve restarts
it where it died; `lag` reports the backlog for health, and the metrics the alerts watch (backlog, export lag,
Redis reachability, expired reservations) are set every REPORT_S."""

from __future__ import annotations

import asyncio
import threading

from ray import serve
from redis.exceptions import RedisError

from serve_app.ledger.database import Database, LedgerConfig
from serve_app.ledger.export import Exporter
from serve_app.money import keyspace
from serve_app.telemetry.logs import configure_logging
from serve_app.telemetry.metrics import ExporterMetrics

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
        self.metrics = ExporterMetrics()
        self.reporter = asyncio.get_running_loop().create_task(self._report())

    async def _report(self) -> None:
        """The export's backlog and lag and Redis's reachability as gauges, and the expired reservations the export
        has stored, every few seconds (alerting on any of them needs no request)."""
        while True:
            try:
                unexported, lag_s = await asyncio.to_thread(self._sample)
            except RedisError:  # the exporter logs it; the backlog's gauges keep their last values
                self.metrics.redis_up.set(0)
            except Exception:  # not Redis's fault (the exporter logs what stops the export)
                pass
            else:
                self.metrics.redis_up.set(1)
                self.metrics.unexported.set(unexported)
                self.metrics.export_lag.set(lag_s)
            self.metrics.expired.set(self.exporter.expired)
            await asyncio.sleep(REPORT_S)

    def _sample(self) -> tuple[int, float]:
        return self.exporter.lag()["unexported"], self.exporter.export_lag_s()

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
