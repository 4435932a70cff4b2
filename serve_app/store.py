"""The Redis keyspace and connection: every key name the service uses is built here, nowhere else.

Money is integer micro-dollars (1 USD = 1_000_000); prices are micro-dollars per million tokens.
"""

from __future__ import annotations

import os
from decimal import ROUND_HALF_UP, Decimal, InvalidOperation

DEFAULT_REDIS_URL = "redis://127.0.0.1:6399/0"
PREFIX = "qbt"
LEDGER = f"{PREFIX}:ledger"
RESERVATION_EXPIRY = f"{PREFIX}:rsv:expiry"
MICROS = 1_000_000


def redis_url(explicit: str | None = None) -> str:
    return explicit or os.environ.get("REDIS_URL") or DEFAULT_REDIS_URL


def key_record(key_hash: str) -> str:
    return f"{PREFIX}:key:{key_hash}"


def account_record(name: str) -> str:
    return f"{PREFIX}:acct:{name}"


def account_keys(name: str) -> str:
    return f"{PREFIX}:acct:{name}:keys"


def reservation(request_id: str) -> str:
    return f"{PREFIX}:rsv:{request_id}"


def async_client(url: str | None = None, max_connections: int = 64):
    """A bounded pool that makes callers wait for a connection rather than fail when all are busy, and retries a
    command on a dropped connection (after a Redis restart), which the idempotent scripts allow."""
    import redis.asyncio as redis
    from redis.asyncio.retry import Retry
    from redis.backoff import ExponentialBackoff
    from redis.exceptions import ConnectionError, TimeoutError

    pool = redis.BlockingConnectionPool.from_url(
        redis_url(url), max_connections=max_connections, timeout=5, decode_responses=True,
        socket_connect_timeout=2, socket_timeout=5, health_check_interval=30,
        retry=Retry(ExponentialBackoff(cap=0.5, base=0.05), retries=2),
        retry_on_error=[ConnectionError, TimeoutError])
    return redis.Redis(connection_pool=pool)


def sync_client(url: str | None = None):
    import redis

    return redis.from_url(redis_url(url), decode_responses=True, socket_connect_timeout=2, socket_timeout=5)


def usd_to_micros(value: str | Decimal) -> int:
    try:
        amount = Decimal(str(value))
    except InvalidOperation:
        raise ValueError(f"not an amount in USD: {value!r}") from None
    micros = amount * MICROS
    if micros != micros.to_integral_value():
        raise ValueError(f"{value} USD has more than 6 decimal places")
    return int(micros)


def micros_to_usd(micros: int | str) -> str:
    """Exact decimal string, for example 12.500000."""
    return str((Decimal(int(micros)) / MICROS).quantize(Decimal("0.000001"), rounding=ROUND_HALF_UP))


def cost_micros(prompt_tokens: int, completion_tokens: int, input_price: int, output_price: int) -> int:
    """What a request costs, rounded up to the micro-dollar; the Lua scripts compute the same formula."""
    return -(-(prompt_tokens * input_price + completion_tokens * output_price) // MICROS)
