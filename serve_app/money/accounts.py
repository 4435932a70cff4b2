"""Accounts and keys, as the operator manages them from the CLI (synchronous Redis). Every write is one script, so
a crash or a dropped connection never leaves half an account or a key outside its account; a top-up carries an
idempotency key, so that a retried top-up credits once."""

from __future__ import annotations

import time

from serve_app.money import keys, keyspace, lua, units
from serve_app.safety.policy import GuardPolicy

IDEMPOTENCY_TTL_S = 7 * 86400  # a top-up retried within a week with the same key credits once

CREATE_ACCOUNT_LUA = lua.script("""
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('HSET', KEYS[1], 'balance', ARGV[1], 'reserved', 0, 'spent', 0, 'requests', 0, 'prompt_tokens', 0,
  'completion_tokens', 0, 'created_ms', ARGV[2])
return 1
""")

CREATE_KEY_LUA = lua.script("""
if redis.call('EXISTS', KEYS[2]) == 0 then return 0 end
redis.call('HSET', KEYS[1], unpack(ARGV, 2))
redis.call('SADD', KEYS[3], ARGV[1])
return 1
""")

TOPUP_LUA = lua.script("""
if KEYS[2] ~= '' then
  local prior = redis.call('GET', KEYS[2])
  if prior then
    if prior ~= ARGV[1] then return {'conflict', prior} end
    return {'replay', prior}
  end
end
if redis.call('EXISTS', KEYS[1]) == 0 then return {'no_account', 0} end
redis.call('HINCRBY', KEYS[1], 'balance', ARGV[1])
if KEYS[2] ~= '' then redis.call('SET', KEYS[2], ARGV[1], 'EX', ARGV[2]) end
return {'ok', ARGV[1]}
""")

REVOKE_LUA = lua.script("""
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('HSET', KEYS[1], 'revoked', '1')
return 1
""")


class AccountError(Exception):
    pass


def create_account(r, name: str, credits_usd: str = "0") -> dict:
    if not name or ":" in name or len(name) > 64:
        raise AccountError(f"invalid account name {name!r}: 1-64 characters, no ':'")
    micros = units.usd_to_micros(credits_usd)
    if micros < 0:
        raise AccountError("credits cannot be negative")
    if not r.eval(CREATE_ACCOUNT_LUA, 1, keyspace.account_record(name), micros, int(time.time() * 1000)):
        raise AccountError(f"account {name!r} already exists")
    return show_account(r, name)


def ensure_account(r, name: str, credits_usd: str) -> dict:
    if not r.exists(keyspace.account_record(name)):
        return create_account(r, name, credits_usd)
    return show_account(r, name)


def topup(r, name: str, usd: str, idempotency_key: str | None = None) -> dict:
    """Credits the account once per idempotency key: a retry with the same key and amount changes nothing."""
    micros = units.usd_to_micros(usd)
    if micros <= 0:
        raise AccountError("a top-up must be positive")
    if idempotency_key is not None and not 1 <= len(idempotency_key) <= 128:
        raise AccountError("an idempotency key has 1 to 128 characters")
    marker = keyspace.topup_idempotency(name, idempotency_key) if idempotency_key else ""
    verdict, value = r.eval(TOPUP_LUA, 2, keyspace.account_record(name), marker, micros, IDEMPOTENCY_TTL_S)
    if verdict == "no_account":
        raise AccountError(f"no account named {name!r}")
    if verdict == "conflict":
        raise AccountError(f"idempotency key {idempotency_key!r} was used for a top-up of "
                           f"${units.micros_to_usd(value)}, not ${units.micros_to_usd(micros)}")
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
               guard: str | None = None, safety_models: bool = False,
               concurrency: int | None = None) -> tuple[str, str]:
    """Returns (key, key_id); the key itself is not stored anywhere. `safety_models` lets the key call the guard
    models directly (a moderation customer); other keys cannot probe what the guard lets through."""
    _require(r, account)
    rpm, tpm, concurrency = _limit("rpm", rpm), _limit("tpm", tpm), _limit("concurrency", concurrency)
    key = keys.new_key()
    digest = keys.key_hash(key)
    kid = keys.key_id(digest)
    fields = {"account": account, "key_id": kid, "revoked": "0", "created_ms": int(time.time() * 1000)}
    if rpm is not None:
        fields["rpm"] = rpm
    if tpm is not None:
        fields["tpm"] = tpm
    if concurrency is not None:
        fields["concurrency"] = concurrency
    if safety_models:
        fields["safety_models"] = "1"
    if guard is not None:
        GuardPolicy.parse(guard, GuardPolicy())  # refuses an unknown mode before it is stored
        fields["guard"] = guard
    flat = [x for item in fields.items() for x in item]
    if not r.eval(CREATE_KEY_LUA, 3, keyspace.key_record(digest), keyspace.account_record(account),
                  keyspace.account_keys(account), digest, *flat):
        raise AccountError(f"no account named {account!r}")
    return key, kid


def revoke_key(r, key_or_id: str) -> str:
    """Revokes a key given itself or its id (`key_` and 12 hex digits, as `qbt keys list` and the ledger show it):
    a key reported leaked by its id is revoked without its secret."""
    given = key_or_id.strip()
    digest = _digest_of_id(r, given) if keys.is_key_id(given) else keys.key_hash(given)
    if not r.eval(REVOKE_LUA, 1, keyspace.key_record(digest)):
        raise AccountError("no such key")
    return keys.key_id(digest)


def _digest_of_id(r, kid: str) -> str:
    prefix = keyspace.key_record(kid.removeprefix("key_"))
    found = [name[len(keyspace.KEY_RECORD_PREFIX):] for name in r.scan_iter(match=prefix + "*", count=1000)]
    if len(found) != 1:
        raise AccountError(f"no such key id {kid}" if not found else f"key id {kid} is ambiguous; revoke the key")
    return found[0]


def _limit(name: str, value: int | None) -> int | None:
    """A key's own limit is a positive count; leaving it out means the service's default (`default_rpm`/`tpm`)."""
    if value is not None and value < 1:
        raise AccountError(f"{name} must be a positive number (leave it out for the service's default)")
    return value


def list_keys(r, account: str) -> list[dict]:
    _require(r, account)
    out = []
    for digest in sorted(r.smembers(keyspace.account_keys(account))):
        k = r.hgetall(keyspace.key_record(digest))
        out.append({"key_id": k.get("key_id"), "revoked": k.get("revoked") == "1",
                    "rpm": int(k["rpm"]) if "rpm" in k else None, "tpm": int(k["tpm"]) if "tpm" in k else None,
                    "guard": k.get("guard"), "safety_models": k.get("safety_models") == "1"})
    return out


def _require(r, name: str) -> dict:
    a = r.hgetall(keyspace.account_record(name))
    if not a:
        raise AccountError(f"no account named {name!r}")
    return a
