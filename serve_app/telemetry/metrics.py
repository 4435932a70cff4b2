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
