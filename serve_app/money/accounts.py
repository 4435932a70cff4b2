"""Accounts, as the operator manages them (the `qbt` CLI and the admin API call these same functions, with
synchronous Redis). Every write is one script that also appends its audit row, so a crash or a dropped connection
never leaves half an account or a change without its record; a top-up carries an idempotency key, so that a retried
top-up credits once."""

from __future__ import annotations

from dataclasses import dataclass

from serve_app.money import keyspace, lua, units

IDEMPOTENCY_TTL_S = 7 * 86400  # a top-up retried within a week with the same key credits once

CREATE_ACCOUNT_LUA = lua.script(lua.CLOCK, lua.AUDIT, """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('HSET', KEYS[1], 'balance', ARGV[1], 'reserved', 0, 'spent', 0, 'requests', 0, 'prompt_tokens', 0,
  'completion_tokens', 0, 'created_ms', now)
audit(ARGV[2], 'account.create', ARGV[4], 'null', snapshot(KEYS[1]), ARGV[3])
return 1
""")

TOPUP_LUA = lua.script(lua.CLOCK, lua.AUDIT, """
if KEYS[2] ~= '' then
  local prior = redis.call('GET', KEYS[2])
  if prior then
    if prior ~= ARGV[1] then return {'conflict', prior} end
    return {'replay', prior}
  end
end
if redis.call('EXISTS', KEYS[1]) == 0 then return {'no_account', 0} end
local before = snapshot(KEYS[1])
redis.call('HINCRBY', KEYS[1], 'balance', ARGV[1])
if KEYS[2] ~= '' then redis.call('SET', KEYS[2], ARGV[1], 'EX', ARGV[2]) end
audit(ARGV[3], 'account.topup', ARGV[5], before, snapshot(KEYS[1]), ARGV[4])
return {'ok', ARGV[1]}
""")


@dataclass(frozen=True, slots=True)
class Change:
    """Who makes a change and under which request id: what the audit row records."""

    actor: str = "cli"
    request_id: str = ""


class AccountError(ValueError):
    """A change refused: the message says why (shown to the operator as it is)."""


class NotFound(AccountError):
    pass


class Conflict(AccountError):
    pass


def create_account(r, name: str, credits_usd: str = "0", change: Change = Change()) -> dict:
    if not name or ":" in name or len(name) > 64:
        raise AccountError(f"invalid account name {name!r}: 1-64 characters, no ':'")
    micros = units.usd_to_micros(credits_usd)
    if micros < 0:
        raise AccountError("credits cannot be negative")
    if not r.eval(CREATE_ACCOUNT_LUA, 1, keyspace.account_record(name), micros, change.actor, change.request_id,
                  name):
        raise Conflict(f"account {name!r} already exists")
    return show_account(r, name)


def ensure_account(r, name: str, credits_usd: str, change: Change = Change()) -> dict:
    if not r.exists(keyspace.account_record(name)):
        return create_account(r, name, credits_usd, change)
    return show_account(r, name)


def topup(r, name: str, usd: str, idempotency_key: str | None = None, change: Change = Change()) -> dict:
    """Credits the account once per idempotency key: a retry with the same key and amount changes nothing."""
    micros = units.usd_to_micros(usd)
    if micros <= 0:
        raise AccountError("a top-up must be positive")
    if idempotency_key is not None and not 1 <= len(idempotency_key) <= 128:
        raise AccountError("an idempotency key has 1 to 128 characters")
    marker = keyspace.topup_idempotency(name, idempotency_key) if idempotency_key else ""
    verdict, value = r.eval(TOPUP_LUA, 2, keyspace.account_record(name), marker, micros, IDEMPOTENCY_TTL_S,
                            change.actor, change.request_id, name)
    if verdict == "no_account":
        raise NotFound(f"no account named {name!r}")
    if verdict == "conflict":
        raise Conflict(f"idempotency key {idempotency_key!r} was used for a top-up of "
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
            "keys": r.scard(keyspace.account_keys(name))}


def list_accounts(r) -> list[dict]:
    """Every account, by name (a scan: the operator's view, not the request path)."""
    names = sorted({n[len(keyspace.ACCOUNT_PREFIX):] for n in r.scan_iter(match=keyspace.ACCOUNT_PREFIX + "*",
                                                                            count=1000)} - {""})
    return [show_account(r, n) for n in names if ":" not in n]


def _require(r, name: str) -> dict:
    a = r.hgetall(keyspace.account_record(name))
    if not a:
        raise NotFound(f"no account named {name!r}")
    return a
