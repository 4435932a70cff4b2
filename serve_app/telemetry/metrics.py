"""Metrics through Ray Serve's metrics API, so they appear in Ray's Prometheus export (named `qbt_*`; Ray prefixes
application metrics with `ray_`), and the request log. Everything here runs once per request, never per token."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field

REQUEST_LOG = logging.getLogger("qbt.requests")
LATENCY_BUCKETS = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120]
TOKEN_BUCKETS = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1]
# The names the alert rules refer to (serve_app/config/monitoring.py), defined once here.
RAY_PREFIX = "ray_"  # what Ray puts before an application metric's name in its Prometheus export
REQUESTS = "qbt_requests_total"
GUARD_ERRORS = "qbt_guard_errors_total"
GUARD_LATENCY = "qbt_guard_latency_seconds"
LEDGER_UNEXPORTED = "qbt_ledger_unexported_rows"
LEDGER_EXPORT_LAG = "qbt_ledger_export_lag_seconds"
LEDGER_REDIS_UP = "qbt_ledger_redis_up"
RESERVATIONS_EXPIRED = "qbt_reservations_expired"


def exported(name: str) -> str:
    """A metric's name as Prometheus sees it."""
    return RAY_PREFIX + name


class IngressMetrics:
    def __init__(self):
        from ray.serve.metrics import Counter, Histogram

        self.requests = Counter(REQUESTS, "Completions requests by model, status and error code.",
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
        self.guard_latency = Histogram(GUARD_LATENCY, "Latency of one guard check.", boundaries=LATENCY_BUCKETS)
        # One per guard call that got no verdict (timeout, error, no replica); the calls are the latency's count.
        self.guard_errors = Counter(GUARD_ERRORS, "Guard calls that failed: the guard was unavailable.")


class ExporterMetrics:
    """The ledger exporter's view of its backlog and of Redis, set every few seconds by its deployment, so that
    alerting on a stalled export, an unreachable Redis or expiring reservations needs no request."""

    def __init__(self):
        from ray.serve.metrics import Gauge

        self.unexported = Gauge(LEDGER_UNEXPORTED, "Ledger rows in Redis not yet in the database.")
        self.export_lag = Gauge(LEDGER_EXPORT_LAG, "Age of the oldest ledger row not yet in the database (0: none).")
        self.redis_up = Gauge(LEDGER_REDIS_UP, "1 while the ledger exporter reaches Redis, 0 while it cannot.")
        # A gauge set to a count that restarts with the exporter (Prometheus's increase() takes the restart as a
        # reset): unlike a Ray Counter, it is exported from 0, so the first expiries after a start count too.
        self.expired = Gauge(RESERVATIONS_EXPIRED, "Reservations that outlived their deadline, settled by admission's "
                             "reconciliation (ledger rows with status expired), stored since the exporter started.")


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
