"""Accounts and keys, as the operator manages them from the CLI (synchronous Redis)."""

from __future__ import annotations

import time

from serve_app.money import keys, keyspace, units
from serve_app.safety.policy import GuardPolicy


class AccountError(Exception):
    pass


def create_account(r, name: str, credits_usd: str = "0") -> dict:
    if not name or ":" in name or len(name) > 64:
        raise AccountError(f"invalid account name {name!r}: 1-64 characters, no ':'")
    micros = units.usd_to_micros(credits_usd)
    if micros < 0:
        raise AccountError("credits cannot be negative")
    created = r.hsetnx(keyspace.account_record(name), "balance", micros)
    if not created:
        raise AccountError(f"account {name!r} already exists")
    r.hset(keyspace.account_record(name), mapping={"reserved": 0, "spent": 0, "requests": 0, "prompt_tokens": 0,
                                                 "completion_tokens": 0, "created_ms": int(time.time() * 1000)})
    return show_account(r, name)


def ensure_account(r, name: str, credits_usd: str) -> dict:
    if not r.exists(keyspace.account_record(name)):
        return create_account(r, name, credits_usd)
    return show_account(r, name)


def topup(r, name: str, usd: str) -> dict:
    micros = units.usd_to_micros(usd)
    if micros <= 0:
        raise AccountError("a top-up must be positive")
    _require(r, name)
    r.hincrby(keyspace.account_record(name), "balance", micros)
    return show_account(r, name)


def show_account(r, name: str) -> dict:
    a = _require(r, name)
    balance, reserved = int(a.get("balance", 0)), int(a.get("reserved", 0))
    return {"account": name, "balance_usd": units.micros_to_usd(balance),
            "reserved_usd": units.micros_to_usd(reserved),
            "available_usd": units.micros_to_usd(balance - reserved),
            "spent_usd": units.micros_to_usd(a.get("spent", 0)), "requests": int(a.get("requests", 0)),
            "prompt_tokens": int(a.get("prompt_tokens", 0)),
            "completion_tokens": int(a.get("completion_tokens", 0)),
            "keys": len(r.smembers(keyspace.account_keys(name)))}


def create_key(r, account: str, rpm: int | None = None, tpm: int | None = None,
               guard: str | None = None) -> tuple[str, str]:
    """Returns (key, key_id); the key itself is not stored anywhere."""
    _require(r, account)
    key = keys.new_key()
    digest = keys.key_hash(key)
    kid = keys.key_id(digest)
    fields = {"account": account, "key_id": kid, "revoked": "0", "created_ms": int(time.time() * 1000)}
    if rpm is not None:
        fields["rpm"] = rpm
    if tpm is not None:
        fields["tpm"] = tpm
    if guard is not None:
        GuardPolicy.parse(guard, GuardPolicy())  # refuses an unknown mode before it is stored
        fields["guard"] = guard
    r.hset(keyspace.key_record(digest), mapping=fields)
    r.sadd(keyspace.account_keys(account), digest)
    return key, kid


def revoke_key(r, key: str) -> str:
    digest = keys.key_hash(key.strip())
    record = keyspace.key_record(digest)
    if not r.exists(record):
        raise AccountError("no such key")
    r.hset(record, "revoked", "1")
    return keys.key_id(digest)


def list_keys(r, account: str) -> list[dict]:
    _require(r, account)
    out = []
    for digest in sorted(r.smembers(keyspace.account_keys(account))):
        k = r.hgetall(keyspace.key_record(digest))
        out.append({"key_id": k.get("key_id"), "revoked": k.get("revoked") == "1",
                    "rpm": int(k["rpm"]) if "rpm" in k else None, "tpm": int(k["tpm"]) if "tpm" in k else None, "guard": k.get("guard")})
    return out


def _require(r, name: str) -> dict:
    a = r.hgetall(keyspace.account_record(name))
    if not a:
        raise AccountError(f"no account named {name!r}")
    return a
