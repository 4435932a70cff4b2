"""Engine metrics of a model replica: vLLM's own Prometheus family (`vllm:*`: running and waiting requests, KV-cache
use, prompt and generation tokens, time to first token, time per output token, end-to-end latency, queue time,
prefix-cache hits, preemptions...), labelled with the served model's name (`model_name`), published through Ray's
metrics agent as Ray Serve LLM does (`log_engine_metrics`). Ray exports them as `ray_vllm_*` (`:` is not allowed in
its metric names), so vLLM's and Ray's stock LLM dashboards read them as they are."""

from __future__ import annotations


def stat_loggers() -> list:
    """What `AsyncLLM`'s `stat_loggers` gets: vLLM's Prometheus logger over Ray's metrics, which replaces the default
    one (an in-process `prometheus_client` registry nothing scrapes in a Serve replica)."""
    from vllm.v1.metrics.ray_wrappers import RayPrometheusStatLogger

    return [RayPrometheusStatLogger]
