"""The Redis keyspace and connection: every key name the service uses is built here, nowhere else (the Lua
scripts get their prefixes from here too, through `money/lua.py`)."""

from __future__ import annotations

import os

DEFAULT_REDIS_URL = "redis://127.0.0.1:6399/0"
PREFIX = "qbt"
LEDGER = f"{PREFIX}:ledger"
RESERVATION_EXPIRY = f"{PREFIX}:rsv:expiry"
KEY_RECORD_PREFIX = f"{PREFIX}:key:"
ACCOUNT_PREFIX = f"{PREFIX}:acct:"
RESERVATION_PREFIX = f"{PREFIX}:rsv:"
CORRUPT_PREFIX = f"{PREFIX}:rsv:corrupt:"  # reservations set aside by the scripts, for the operator
DONE_PREFIX = f"{PREFIX}:done:"  # reservations reconciled as expired, awaiting a late settlement (a day)
STATS = f"{PREFIX}:stats"  # counters the scripts keep (corrupt_reservations)
AUDIT = f"{PREFIX}:audit"  # every operator change (a stream, never trimmed)
KEY_ID_PREFIX = f"{PREFIX}:keyid:"  # key id -> the key's record
ADMIN_TOKEN_PREFIX = f"{PREFIX}:admin:token:"  # admin tokens, by SHA-256


def redis_url(explicit: str | None = None) -> str:
    return explicit or os.environ.get("REDIS_URL") or DEFAULT_REDIS_URL


def shown(url: str) -> str:
    """A Redis URL fit for a message or a log: its password (and user) replaced."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    if parts.password is None and parts.username is None:
        return url
    host = parts.hostname or ""
    netloc = f"***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


def credentials() -> dict:
    """Redis's password from the file `REDIS_PASSWORD_FILE` names (`qbt serve` makes one for the Redis it starts):
    never in the URL, argv or an environment variable's value."""
    path = os.environ.get("REDIS_PASSWORD_FILE")
    if not path:
        return {}
    with open(path) as f:
        return {"password": f.read().strip()}


def key_record(key_hash: str) -> str:
    return KEY_RECORD_PREFIX + key_hash


def key_by_id(key_id: str) -> str:
    return KEY_ID_PREFIX + key_id


def admin_token(token_hash: str) -> str:
    return ADMIN_TOKEN_PREFIX + token_hash


def account_record(name: str) -> str:
    return ACCOUNT_PREFIX + name


def account_keys(name: str) -> str:
    return ACCOUNT_PREFIX + name + ":keys"


def topup_idempotency(account: str, key: str) -> str:
    return f"{PREFIX}:topup:{account}:{key}"


def reservation(completion_id: str) -> str:
    return RESERVATION_PREFIX + completion_id


def async_client(url: str | None = None, max_connections: int = 64):
    """A bounded pool that makes callers wait for a connection rather than fail when all are busy, and retries a
    command on a dropped connection (after a Redis restart), which the idempotent scripts allow."""
    import redis.asyncio as redis
    from redis.asyncio.retry import Retry
    from redis.backoff import ExponentialBackoff
    from redis.exceptions import ConnectionError, TimeoutError

    pool = redis.BlockingConnectionPool.from_url(
        redis_url(url), **credentials(), max_connections=max_connections, timeout=5, decode_responses=True,
        socket_connect_timeout=2, socket_timeout=5, health_check_interval=30,
        retry=Retry(ExponentialBackoff(cap=0.5, base=0.05), retries=2),
        retry_on_error=[ConnectionError, TimeoutError])
    return redis.Redis(connection_pool=pool)


def sync_client(url: str | None = None):
    import redis

    return redis.from_url(redis_url(url), **credentials(), decode_responses=True, socket_connect_timeout=2,
                          socket_timeout=5)
