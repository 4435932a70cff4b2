"""Engine metrics of a model replica: a vLLM stat logger publishing running and waiting requests and KV-cache use."""

from __future__ import annotations


class EngineStatsLogger:
    """A vLLM stat logger that publishes running and waiting requests and KV-cache use per model replica."""

    def __init__(self, model: str):
        from ray.serve.metrics import Gauge

        tags = ("model",)  # Ray Serve adds its own deployment, replica and application tags
        self.tags = {"model": model}
        self.running = Gauge("qbt_engine_running_requests", "Requests running in the engine.", tag_keys=tags)
        self.waiting = Gauge("qbt_engine_waiting_requests", "Requests waiting in the engine.", tag_keys=tags)
        self.kv_cache = Gauge("qbt_engine_kv_cache_usage_ratio", "KV-cache use, 0 to 1.", tag_keys=tags)
        self._last: tuple | None = None

    def publish(self, running: int, waiting: int, kv_cache: float) -> None:
        """Called every engine step; the gauges are only touched when a value changed."""
        now = (running, waiting, round(kv_cache, 3))
        if now == self._last:
            return
        self._last = now
        self.running.set(running, tags=self.tags)
        self.waiting.set(waiting, tags=self.tags)
        self.kv_cache.set(now[2], tags=self.tags)

    def factory(self):
        """What vLLM's `stat_loggers` wants: a callable (vllm_config, engine_index) -> StatLoggerBase."""
        from vllm.v1.metrics.loggers import StatLoggerBase

        outer = self

        class _Logger(StatLoggerBase):
            def __init__(self, vllm_config, engine_index: int = 0):
                pass

            def record(self, scheduler_stats, iteration_stats, mm_cache_stats=None, engine_idx: int = 0):
                if scheduler_stats is not None:
                    outer.publish(scheduler_stats.num_running_reqs, scheduler_stats.num_waiting_reqs,
                                  scheduler_stats.kv_cache_usage)

            def log_engine_initialized(self):
                pass

        return _Logger
