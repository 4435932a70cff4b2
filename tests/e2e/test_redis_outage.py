"""Redis away: the service fails closed (503, never unmetered) and recovers, balances intact, when Redis returns."""

from __future__ import annotations

import time

import httpx
import pytest

from serve_app.money import accounts, keyspace
from tests.support import MODEL

pytestmark = pytest.mark.e2e
BODY = {"model": MODEL, "prompt": "The capital of Canada is", "max_tokens": 2}


def test_redis_down_is_503_and_recovery_keeps_balances(stack, customer, redis_server):
    auth = {"Authorization": f"Bearer {customer.key}"}
    assert httpx.post(stack.base_url + "/v1/completions", json=BODY, headers=auth, timeout=60).status_code == 200
    before = accounts.show_account(keyspace.sync_client(redis_server.url), customer.account)
    redis_server.stop()
    try:
        res = httpx.post(stack.base_url + "/v1/completions", json=BODY, headers=auth, timeout=60)
        assert res.status_code == 503
        assert res.json()["error"]["code"] == "service_unavailable"
        assert res.headers["retry-after"]
        assert httpx.get(stack.base_url + "/health", timeout=60).status_code == 503
    finally:
        redis_server.start()
    deadline = time.monotonic() + 30
    while True:
        res = httpx.post(stack.base_url + "/v1/completions", json=BODY, headers=auth, timeout=60)
        if res.status_code == 200 or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert res.status_code == 200
    after = accounts.show_account(keyspace.sync_client(redis_server.url), customer.account)
    assert after["requests"] == before["requests"] + 1
    assert after["balance_usd"] < before["balance_usd"]
