from __future__ import annotations

import pytest

from serve_app.money import keys, units
from serve_app.api.errors import ApiError, Code
from serve_app.money.limits import LimitState, go_duration, rate_limit_error


def test_usd_micros_round_trip():
    assert units.usd_to_micros("12.5") == 12_500_000
    assert units.micros_to_usd(12_500_001) == "12.500001"
    assert units.micros_to_usd(-5) == "-0.000005"
    with pytest.raises(ValueError):
        units.usd_to_micros("0.0000001")
    with pytest.raises(ValueError):
        units.usd_to_micros("ten")
    for absurd in ("Infinity", "-Infinity", "NaN", "sNaN", "1e30", "1e999999", "-1e30", "9007199254.740992"):
        with pytest.raises(ValueError):
            units.usd_to_micros(absurd)
    assert units.usd_to_micros("9007199254.740991") == 2**53 - 1


def test_go_durations():
    assert go_duration(12) == "12ms"
    assert go_duration(1000) == "1s"
    assert go_duration(1500) == "1.5s"
    assert go_duration(360_000) == "6m0s"


def test_limit_headers_only_for_set_limits():
    assert LimitState(0, 0, 0, 0, 0, 0).headers() == {}
    h = LimitState(60, 59, 1000, 1000, 900, 6000).headers()
    assert h["x-ratelimit-remaining-requests"] == "59" and h["x-ratelimit-reset-tokens"] == "6s"


def test_rate_limit_error_has_retry_after():
    err = rate_limit_error(["requests", 60, 0, 2500, 0, 0, 0])
    assert err.code is Code.RATE_LIMIT_EXCEEDED and err.status == 429
    assert err.headers["Retry-After"] == "3"
    too_big = rate_limit_error(["tokens_over", 100, 500])
    assert too_big.headers["x-should-retry"] == "false"


@pytest.mark.parametrize("header", [None, "", "Bearer", "bearer sk-1", "Token qbt_x", "Bearer " + "qbt_" + "a" * 300])
def test_bearer_refuses_malformed(header):
    with pytest.raises(ApiError) as info:
        keys.bearer_key(header)
    assert info.value.status == 401


def test_keys_are_random_and_hashed():
    a, b = keys.new_key(), keys.new_key()
    assert a != b and a.startswith("qbt_") and len(a) == 44
    assert keys.bearer_key(f"Bearer {a}") == a
    assert keys.key_id(keys.key_hash(a)).startswith("key_")
