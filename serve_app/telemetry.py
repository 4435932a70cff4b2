"""Logs, metrics and traces. Metrics go through Ray Serve's metrics API, so they appear in Ray's Prometheus export
(named `qbt_*`; Ray prefixes application metrics with `ray_`). Everything here runs once per request or per engine
step, never per token."""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field

REQUEST_LOG = logging.getLogger("qbt.requests")
LATENCY_BUCKETS = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120]
TOKEN_BUCKETS = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1]


def configure_logging(level: int = logging.INFO, names: tuple[str, ...] = ("qbt",)) -> None:
    """Sends these loggers (`qbt.*`; in a model replica also `vllm.*`) to Ray Serve's handlers, so they land in the
    replica's log file."""
    serve_handlers = logging.getLogger("ray.serve").handlers
    for name in names:
        logger = logging.getLogger(name)
        if serve_handlers and not logger.handlers:
            for handler in serve_handlers:
                logger.addHandler(handler)
            logger.propagate = False
        logger.setLevel(level)


class IngressMetrics:
    def __init__(self):
        from ray.serve.metrics import Counter, Histogram

        self.requests = Counter("qbt_requests_total", "Completions requests by model, status and error code.",
                                tag_keys=("model", "status", "code"))
        self.prompt_tokens = Counter("qbt_prompt_tokens_total", "Prompt tokens processed.", tag_keys=("model",))
        self.completion_tokens = Counter("qbt_completion_tokens_total", "Completion tokens generated.",
                                         tag_keys=("model",))
        self.charged = Counter("qbt_credit_charged_usd_total", "Credit charged to accounts, USD.",
                               tag_keys=("model",))
        self.rate_limited = Counter("qbt_rate_limit_rejections_total", "Requests refused by a rate limit.",
                                    tag_keys=("model",))
        self.guard_verdicts = Counter("qbt_guard_verdicts_total", "Guard verdicts by direction and outcome.",
                                      tag_keys=("direction", "verdict"))
        self.ttft = Histogram("qbt_time_to_first_token_seconds", "Time to first token at the ingress.",
                              boundaries=LATENCY_BUCKETS, tag_keys=("model",))
        self.tpot = Histogram("qbt_time_per_output_token_seconds", "Mean time per output token after the first.",
                              boundaries=TOKEN_BUCKETS, tag_keys=("model",))
        self.duration = Histogram("qbt_request_duration_seconds", "Request duration at the ingress.",
                                  boundaries=LATENCY_BUCKETS, tag_keys=("model", "status"))
        self.guard_latency = Histogram("qbt_guard_latency_seconds", "Latency of one guard check.",
                                       boundaries=LATENCY_BUCKETS)


@dataclass(slots=True)
class RequestRecord:
    """What one request leaves in the metrics and the request log (never its text)."""

    request_id: str
    completion_id: str
    model: str
    started: float = field(default_factory=time.monotonic)
    first_token: float | None = None
    account: str | None = None
    key_id: str | None = None
    stream: bool = False

    def mark_first_token(self) -> None:
        if self.first_token is None:
            self.first_token = time.monotonic()


def record_request(metrics: IngressMetrics, rec: RequestRecord, status: str, code: str | None,
                   prompt_tokens: int, completion_tokens: int, charged_micros: int | None) -> None:
    now = time.monotonic()
    tags = {"model": rec.model}
    metrics.requests.inc(tags={**tags, "status": status, "code": code or "none"})
    metrics.duration.observe(now - rec.started, tags={**tags, "status": status})
    if prompt_tokens:
        metrics.prompt_tokens.inc(prompt_tokens, tags=tags)
    if completion_tokens:
        metrics.completion_tokens.inc(completion_tokens, tags=tags)
    if charged_micros:
        metrics.charged.inc(charged_micros / 1_000_000, tags=tags)
    if code == "rate_limit_exceeded":
        metrics.rate_limited.inc(tags=tags)
    ttft = tpot = None
    if rec.first_token is not None:
        ttft = rec.first_token - rec.started
        metrics.ttft.observe(ttft, tags=tags)
        if completion_tokens > 1:
            tpot = (now - rec.first_token) / (completion_tokens - 1)
            metrics.tpot.observe(tpot, tags=tags)
    REQUEST_LOG.info(json.dumps({
        "event": "completion", "request_id": rec.request_id, "completion_id": rec.completion_id,
        "account": rec.account, "key_id": rec.key_id, "model": rec.model, "stream": rec.stream, "status": status,
        "code": code, "prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
        "cost_micros": charged_micros, "latency_ms": round((now - rec.started) * 1000, 2),
        "ttft_ms": round(ttft * 1000, 2) if ttft is not None else None}))


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


_tracer = None


def tracer():
    """The OpenTelemetry tracer, with the exporter chosen by the standard `OTEL_TRACES_EXPORTER` (`otlp`, `console`
    or `none`, the default; `OTEL_EXPORTER_OTLP_*` configure OTLP). With none, spans are non-recording no-ops."""
    global _tracer
    if _tracer is None:
        from opentelemetry import trace

        exporter = os.environ.get("OTEL_TRACES_EXPORTER", "none").split(",")[0].strip().lower()
        if exporter not in ("", "none"):
            from opentelemetry.sdk.resources import Resource
            from opentelemetry.sdk.trace import TracerProvider
            from opentelemetry.sdk.trace.export import BatchSpanProcessor

            provider = TracerProvider(resource=Resource.create(
                {"service.name": os.environ.get("OTEL_SERVICE_NAME", "qubittron-serve")}))
            provider.add_span_processor(BatchSpanProcessor(_exporter(exporter)))
            trace.set_tracer_provider(provider)
        _tracer = trace.get_tracer("qubittron-serve")
    return _tracer


def _exporter(name: str):
    if name == "console":
        from opentelemetry.sdk.trace.export import ConsoleSpanExporter

        return ConsoleSpanExporter(formatter=lambda span: span.to_json(indent=None) + "\n")
    if name == "otlp":
        if os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf") == "grpc":
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
        else:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        return OTLPSpanExporter()
    raise ValueError(f"OTEL_TRACES_EXPORTER={name!r}: use otlp, console or none")


def context_from(carrier) -> object:
    """A W3C `traceparent` (from a client's headers, or from the ingress across the Serve handle)."""
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    return TraceContextTextMapPropagator().extract(carrier=carrier)


def carrier_of(span) -> dict[str, str]:
    from opentelemetry import trace
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    out: dict[str, str] = {}
    TraceContextTextMapPropagator().inject(out, context=trace.set_span_in_context(span))
    return out


def child(name: str, parent, **attributes):
    """A span under `parent` (a span), for work that ends elsewhere than it starts."""
    from opentelemetry import trace

    return tracer().start_span(name, context=trace.set_span_in_context(parent), attributes=attributes or None)
