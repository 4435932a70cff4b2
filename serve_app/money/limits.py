"""Per-key rate limits (requests and tokens per minute) as GCRA in Redis, and their OpenAI-style headers.

GCRA keeps one "theoretical arrival time" per limit: a request of cost c moves it by c * 60s / limit, and is
admitted while that time stays within one minute of now. It never admits twice the limit at a window boundary,
which a fixed window does. The arithmetic runs inside the admission script; this module renders its results.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from serve_app.api.errors import ApiError, Code


def go_duration(ms: int) -> str:
    """OpenAI's reset headers use Go-style durations: `1s`, `6m0s`, `12ms`."""
    ms = max(int(ms), 0)
    if ms < 1000:
        return f"{ms}ms"
    seconds = ms / 1000
    if seconds < 60:
        return f"{seconds:g}s"
    minutes, rest = divmod(seconds, 60)
    return f"{int(minutes)}m{rest:g}s"


@dataclass(slots=True)
class LimitState:
    rpm: int
    rpm_remaining: int
    rpm_reset_ms: int
    tpm: int
    tpm_remaining: int
    tpm_reset_ms: int

    @classmethod
    def from_script(cls, values) -> LimitState:
        return cls(*(int(v) for v in values))

    def headers(self) -> dict[str, str]:
        out = {}
        if self.rpm > 0:
            out.update({"x-ratelimit-limit-requests": str(self.rpm),
                        "x-ratelimit-remaining-requests": str(max(self.rpm_remaining, 0)),
                        "x-ratelimit-reset-requests": go_duration(self.rpm_reset_ms)})
        if self.tpm > 0:
            out.update({"x-ratelimit-limit-tokens": str(self.tpm),
                        "x-ratelimit-remaining-tokens": str(max(self.tpm_remaining, 0)),
                        "x-ratelimit-reset-tokens": go_duration(self.tpm_reset_ms)})
        return out


def rate_limit_error(res) -> ApiError:
    """From the admission script's refusal: its kind, then rpm, remaining, reset (the wait when it is the one
    refused), tpm, remaining, reset."""
    kind = res[0]
    if kind == "concurrency":
        return ApiError(Code.RATE_LIMIT_EXCEEDED, f"Too many concurrent requests for this key: limit {int(res[1])}. "
                        "Retry when one of them has finished.", headers={"Retry-After": "1"})
    if kind == "tokens_over":
        limit, requested = int(res[1]), int(res[2])
        return ApiError(Code.RATE_LIMIT_EXCEEDED,
                        f"This request needs {requested} tokens (prompt plus max_tokens for every choice), more "
                        f"than the key's limit of {limit} tokens per minute; lower max_tokens or n.",
                        headers={"x-should-retry": "false"})
    state = LimitState.from_script(res[1:7])
    wait_ms = state.rpm_reset_ms if kind == "requests" else state.tpm_reset_ms
    limit = state.rpm if kind == "requests" else state.tpm
    unit = "requests per minute (RPM)" if kind == "requests" else "tokens per minute (TPM)"
    headers = state.headers()
    headers["Retry-After"] = str(max(1, math.ceil(wait_ms / 1000)))
    return ApiError(Code.RATE_LIMIT_EXCEEDED,
                    f"Rate limit reached on {unit}: limit {limit}. Please try again in {go_duration(wait_ms)}.",
                    headers=headers)
