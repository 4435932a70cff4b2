"""Repeated invalid keys from one address: throttled after `limit` failures, for the rest of the window only."""

from __future__ import annotations

import pytest

from serve_app.api import throttle
from serve_app.api.errors import ApiError, Code
from serve_app.api.throttle import AuthFailures


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def test_an_address_is_refused_after_its_limit_until_the_window_ends():
    clock = Clock()
    t = AuthFailures(limit=3, window_s=10, clock=clock)
    for _ in range(3):
        t.check("10.0.0.1")
        t.failed("10.0.0.1")
    with pytest.raises(ApiError) as exc:
        t.check("10.0.0.1")
    assert exc.value.code is Code.RATE_LIMIT_EXCEEDED and exc.value.status == 429
    assert exc.value.headers["Retry-After"] == "10"
    t.check("10.0.0.2")  # another address is not affected
    clock.now += 10.5
    t.check("10.0.0.1")  # the window is over
    t.failed("10.0.0.1")
    t.check("10.0.0.1")


def test_failures_spread_over_windows_never_add_up():
    clock = Clock()
    t = AuthFailures(limit=2, window_s=1, clock=clock)
    for _ in range(10):
        t.failed("a")
        clock.now += 1.1
        t.check("a")


def test_memory_is_bounded_and_no_address_is_no_throttle(monkeypatch):
    monkeypatch.setattr(throttle, "MAX_ADDRESSES", 3)
    t = AuthFailures(limit=1)
    for i in range(10):
        t.failed(f"10.0.0.{i}")
    assert len(t._seen) == 3 and "10.0.0.9" in t._seen
    t.failed(None)
    t.check(None)
