"""Accounts and keys, as the operator manages them from the CLI (synchronous Redis)."""

from __future__ import annotations

import time

from serve_app import auth, store


class AccountError(Exception):
    pass


def create_account(r, name: str, credits_usd: str = "0") -> dict:
    if not name or ":" in name or len(name) > 64:
        raise AccountError(f"invalid account name {name!r}: 1-64 characters, no ':'")
    micros = store.usd_to_micros(credits_usd)
    if micros < 0:
        raise AccountError("credits cannot be negative")
    created = r.hsetnx(store.account_record(name), "balance", micros)
    if not created:
        raise AccountError(f"account {name!r} already exists")
    r.hset(store.account_record(name), mapping={"reserved": 0, "spent": 0, "requests": 0, "prompt_tokens": 0,
                                                 "completion_tokens": 0, "created_ms": int(time.time() * 1000)})
    return show_account(r, name)


def ensure_account(r, name: str, credits_usd: str) -> dict:
    if not r.exists(store.account_record(name)):
        return create_account(r, name, credits_usd)
    return show_account(r, name)


def topup(r, name: str, usd: str) -> dict:
    micros = store.usd_to_micros(usd)
    if micros <= 0:
        raise AccountError("a top-up must be positive")
    _require(r, name)
    r.hincrby(store.account_record(name), "balance", micros)
    return show_account(r, name)


def show_account(r, name: str) -> dict:
    a = _require(r, name)
    balance, reserved = int(a.get("balance", 0)), int(a.get("reserved", 0))
    return {"account": name, "balance_usd": store.micros_to_usd(balance),
            "reserved_usd": store.micros_to_usd(reserved),
            "available_usd": store.micros_to_usd(balance - reserved),
            "spent_usd": store.micros_to_usd(a.get("spent", 0)), "requests": int(a.get("requests", 0)),
            "prompt_tokens": int(a.get("prompt_tokens", 0)),
            "completion_tokens": int(a.get("completion_tokens", 0)),
            "keys": len(r.smembers(store.account_keys(name)))}


def create_key(r, account: str, rpm: int | None = None, tpm: int | None = None,
               guard: str | None = None) -> tuple[str, str]:
    """Returns (key, key_id); the key itself is not stored anywhere."""
    _require(r, account)
    key = auth.new_key()
    digest = auth.key_hash(key)
    kid = auth.key_id(digest)
    fields = {"account": account, "key_id": kid, "revoked": "0", "created_ms": int(time.time() * 1000)}
    if rpm is not None:
        fields["rpm"] = rpm
    if tpm is not None:
        fields["tpm"] = tpm
    if guard is not None:
        from serve_app.guard import GuardPolicy

        GuardPolicy.parse(guard, GuardPolicy())  # refuses an unknown mode before it is stored
        fields["guard"] = guard
    r.hset(store.key_record(digest), mapping=fields)
    r.sadd(store.account_keys(account), digest)
    return key, kid


def revoke_key(r, key: str) -> str:
    digest = auth.key_hash(key.strip())
    record = store.key_record(digest)
    if not r.exists(record):
        raise AccountError("no such key")
    r.hset(record, "revoked", "1")
    return auth.key_id(digest)


def list_keys(r, account: str) -> list[dict]:
    _require(r, account)
    out = []
    for digest in sorted(r.smembers(store.account_keys(account))):
        k = r.hgetall(store.key_record(digest))
        out.append({"key_id": k.get("key_id"), "revoked": k.get("revoked") == "1",
                    "rpm": int(k["rpm"]) if "rpm" in k else None, "tpm": int(k["tpm"]) if "tpm" in k else None, "guard": k.get("guard")})
    return out


def _require(r, name: str) -> dict:
    a = r.hgetall(store.account_record(name))
    if not a:
        raise AccountError(f"no account named {name!r}")
    return a
