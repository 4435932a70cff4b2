"""API keys as the operator manages them (the `qbt` CLI and the admin API call these functions): create with
limits, expiry, a budget and allowed models; list; revoke; rotate with a grace period. What a key may do is then
enforced by the admission script alone (`money/admission.py`), against Redis's clock.

A key is one record, named by the SHA-256 of its first secret and known by its id (`key_` + 12 hex digits). A
rotation adds a secret record pointing at it (`alias_of`) and gives the replaced secret an end (`secret_expires_ms`),
so both secrets share the key's limits, budget and state while the grace lasts."""

from __future__ import annotations

from datetime import datetime, timezone
from decimal import Decimal
from enum import Enum
from typing import Annotated

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from serve_app.money import keys, keyspace, lua, units
from serve_app.money.accounts import AccountError, Change, NotFound
from serve_app.safety.policy import GuardPolicy

MODEL_ID = r"^[A-Za-z0-9._-]+$"
MAX_GRACE_S = 30 * 86400


class BudgetPeriod(str, Enum):
    """When a key's budget starts again, in UTC; `total` never does."""

    DAY = "day"
    WEEK = "week"
    MONTH = "month"
    TOTAL = "total"


class KeySpec(BaseModel):
    """What a new key may do. Left out: the service's defaults (rate limits), no expiry, no budget, every model."""

    model_config = ConfigDict(extra="forbid")
    rpm: Annotated[int, Field(ge=1)] | None = None
    tpm: Annotated[int, Field(ge=1)] | None = None
    concurrency: Annotated[int, Field(ge=1)] | None = None
    guard: str | None = None
    safety_models: bool = False
    expires_at: AwareDatetime | None = None
    expires_in_s: Annotated[int, Field(ge=1, le=10 * 365 * 86400)] | None = None  # from Redis's clock
    budget_usd: Annotated[Decimal, Field(gt=0, max_digits=18, decimal_places=6)] | None = None
    budget_period: BudgetPeriod | None = None
    models: Annotated[list[Annotated[str, Field(pattern=MODEL_ID, max_length=128)]],
                      Field(min_length=1, max_length=64)] | None = None

    @field_validator("guard")
    @classmethod
    def _known_guard(cls, v: str | None) -> str | None:
        if v is not None:
            GuardPolicy.parse(v, GuardPolicy())  # refuses an unknown mode before it is stored
        return v

    @model_validator(mode="after")
    def _consistent(self) -> KeySpec:
        if self.expires_at is not None and self.expires_in_s is not None:
            raise ValueError("give expires_at or expires_in_s, not both")
        if self.budget_period is not None and self.budget_usd is None:
            raise ValueError("budget_period needs budget_usd")
        return self

    @classmethod
    def parse(cls, **fields) -> KeySpec:
        try:
            return cls(**fields)
        except ValidationError as e:
            first = e.errors()[0]
            where = ".".join(str(p) for p in first["loc"])
            raise AccountError(f"{where + ': ' if where else ''}{first['msg']}") from None

    def record_fields(self) -> dict[str, str | int]:
        out: dict[str, str | int] = {}
        for name in ("rpm", "tpm", "concurrency", "guard"):
            if getattr(self, name) is not None:
                out[name] = getattr(self, name)
        if self.safety_models:
            out["safety_models"] = "1"
        if self.expires_at is not None:
            out["expires_ms"] = int(self.expires_at.timestamp() * 1000)
        if self.budget_usd is not None:
            out["budget_micros"] = units.usd_to_micros(self.budget_usd)
            out["budget_period"] = (self.budget_period or BudgetPeriod.MONTH).value
        if self.models:
            out["models"] = ",".join(dict.fromkeys(self.models))
        return out


CREATE_KEY_LUA = lua.script(lua.CLOCK, lua.AUDIT, """
if redis.call('EXISTS', KEYS[2]) == 0 then return 0 end
redis.call('HSET', KEYS[1], 'created_ms', now, unpack(ARGV, 6))
if ARGV[4] ~= '' then redis.call('HSET', KEYS[1], 'expires_ms', now + tonumber(ARGV[4])) end
redis.call('SADD', KEYS[3], ARGV[1])
redis.call('SET', KEYS[4], KEYS[1])
audit(ARGV[2], 'key.create', ARGV[5], 'null', snapshot(KEYS[1]), ARGV[3])
return 1
""")

REVOKE_LUA = lua.script(lua.CLOCK, lua.AUDIT, """
local before = snapshot(KEYS[1])
if before == 'null' then return 0 end
redis.call('HSET', KEYS[1], 'revoked', '1')
audit(ARGV[1], 'key.revoke', ARGV[3], before, snapshot(KEYS[1]), ARGV[2])
return 1
""")

# The replaced secret (the key's record itself, or the newest secret) works until the grace ends, never longer than
# it already would; the new secret's record points at the key's.
ROTATE_LUA = lua.script(lua.CLOCK, lua.AUDIT, """
local p = redis.call('HMGET', KEYS[1], 'key_id', 'revoked', 'current_secret', 'account')
if not p[1] then return {'missing'} end
if p[2] == '1' then return {'revoked'} end
local before = snapshot(KEYS[1])
local old = p[3] or KEYS[1]
local ends = now + tonumber(ARGV[1])
local prior = tonumber(redis.call('HGET', old, 'secret_expires_ms'))
if not prior or prior > ends then redis.call('HSET', old, 'secret_expires_ms', ends) end
if old ~= KEYS[1] then redis.call('PEXPIREAT', old, ends + 86400000) end
redis.call('HSET', KEYS[2], 'alias_of', KEYS[1], 'key_id', p[1], 'account', p[4], 'created_ms', now)
redis.call('HSET', KEYS[1], 'current_secret', KEYS[2], 'grace_until_ms', ends, 'rotated_ms', now)
audit(ARGV[2], 'key.rotate', p[1], before, snapshot(KEYS[1]), ARGV[3])
return {'ok', ends}
""")

# What each key has spent in its current period, by the admission script's own rule.
BUDGET_NOW_LUA = lua.script(lua.CLOCK, lua.BUDGET, """
local out = {}
for i, rec in ipairs(KEYS) do
  local k = redis.call('HMGET', rec, 'budget_window', 'budget_spent', 'budget_period')
  out[i] = tostring(budget_spent(k[1], k[2], k[3]))
end
return out
""")


def create_key(r, account: str, change: Change = Change(), known_models: set[str] | None = None,
               **spec) -> tuple[str, str]:
    """Returns (key, key_id); the key itself is not stored anywhere. `safety_models` lets the key call the guard
    models directly (a moderation customer); other keys cannot probe what the guard lets through."""
    parsed = KeySpec.parse(**spec)
    if known_models is not None and parsed.models:
        unknown = sorted(set(parsed.models) - known_models)
        if unknown:
            raise AccountError(f"models: no such model {', '.join(unknown)}")
    key = keys.new_key()
    digest = keys.key_hash(key)
    kid = keys.key_id(digest)
    fields = {"account": account, "key_id": kid, "revoked": "0", **parsed.record_fields()}
    flat = [x for item in fields.items() for x in item]
    expires_in_ms = parsed.expires_in_s * 1000 if parsed.expires_in_s else ""
    if not r.eval(CREATE_KEY_LUA, 4, keyspace.key_record(digest), keyspace.account_record(account),
                  keyspace.account_keys(account), keyspace.key_by_id(kid), digest, change.actor, change.request_id,
                  expires_in_ms, kid, *flat):
        raise NotFound(f"no account named {account!r}")
    return key, kid


def revoke_key(r, key_or_id: str, change: Change = Change()) -> str:
    """Revokes a key given one of its secrets or its id (as `qbt keys list` and the ledger show it): a key reported
    leaked by its id is revoked without its secret, and every secret of it stops at once."""
    record = _record(r, key_or_id)
    kid = r.hget(record, "key_id") or ""
    if not r.eval(REVOKE_LUA, 1, record, change.actor, change.request_id, kid):
        raise NotFound("no such key")
    return kid


def rotate_key(r, key_or_id: str, grace_s: int, change: Change = Change()) -> tuple[str, dict]:
    """A new secret for the key; the one it replaces keeps working for `grace_s` seconds. Returns (new secret,
    the key as `list_keys` shows it)."""
    if not 0 <= grace_s <= MAX_GRACE_S:
        raise AccountError(f"grace_s must be between 0 and {MAX_GRACE_S} seconds")
    record = _record(r, key_or_id)
    key = keys.new_key()
    verdict, *_ = r.eval(ROTATE_LUA, 2, record, keyspace.key_record(keys.key_hash(key)), grace_s * 1000,
                         change.actor, change.request_id)
    if verdict == "missing":
        raise NotFound("no such key")
    if verdict == "revoked":
        raise AccountError("the key is revoked: create a new one")
    return key, _views(r, [record])[0]


def show_key(r, key_or_id: str) -> dict:
    """One key as `list_keys` shows it, from its id or any of its secrets."""
    return _views(r, [_record(r, key_or_id)])[0]


def list_keys(r, account: str | None = None) -> list[dict]:
    """One account's keys, or every key."""
    if account is not None:
        if not r.exists(keyspace.account_record(account)):
            raise NotFound(f"no account named {account!r}")
        names = [account]
    else:
        names = [n[len(keyspace.ACCOUNT_PREFIX):-len(":keys")]
                 for n in r.scan_iter(match=keyspace.ACCOUNT_PREFIX + "*:keys", count=1000)]
    records = [keyspace.key_record(d) for n in sorted(names) for d in sorted(r.smembers(keyspace.account_keys(n)))]
    return _views(r, records)


def _views(r, records: list[str]) -> list[dict]:
    if not records:
        return []
    spent = r.eval(BUDGET_NOW_LUA, len(records), *records)
    out = []
    for record, budget_spent in zip(records, spent):
        k = r.hgetall(record)
        budget = k.get("budget_micros")
        out.append({
            "key_id": k.get("key_id"), "account": k.get("account"), "revoked": k.get("revoked") == "1",
            "rpm": _int(k.get("rpm")), "tpm": _int(k.get("tpm")), "concurrency": _int(k.get("concurrency")),
            "guard": k.get("guard"), "safety_models": k.get("safety_models") == "1",
            "expires_at": iso(k.get("expires_ms")),
            "budget_usd": units.micros_to_usd(budget) if budget else None,
            "budget_period": k.get("budget_period") if budget else None,
            "budget_spent_usd": units.micros_to_usd(budget_spent) if budget else None,
            "models": k["models"].split(",") if k.get("models") else None,
            "created_at": iso(k.get("created_ms")), "grace_until": iso(k.get("grace_until_ms"))})
    return out


def _record(r, key_or_id: str) -> str:
    """The key's record, from its id or any of its secrets."""
    given = key_or_id.strip()
    if keys.is_key_id(given):
        record = r.get(keyspace.key_by_id(given)) or _scan_for_id(r, given)
    else:
        record = keyspace.key_record(keys.key_hash(given))
        record = r.hget(record, "alias_of") or record
    if not r.exists(record):
        raise NotFound("no such key")
    return record


def _scan_for_id(r, kid: str) -> str:
    """Keys created before the id index: their record's name starts with the id's hex digits."""
    prefix = keyspace.key_record(kid.removeprefix("key_"))
    found = [n for n in r.scan_iter(match=prefix + "*", count=1000) if not r.hexists(n, "alias_of")]
    if len(found) != 1:
        raise NotFound(f"no such key id {kid}" if not found else f"key id {kid} is ambiguous; give the key")
    return found[0]


def _int(v: str | None) -> int | None:
    return int(v) if v is not None else None


def iso(ms: str | int | None) -> str | None:
    if ms is None or ms == "":
        return None
    return datetime.fromtimestamp(int(ms) / 1000, tz=timezone.utc).isoformat(timespec="seconds").replace(
        "+00:00", "Z")
