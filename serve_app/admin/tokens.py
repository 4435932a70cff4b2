"""Admin tokens: `qbta_` plus 40 random characters, shown once, stored only as their SHA-256 with the name of the
person or system they belong to (the `actor` of every audit row their changes leave)."""

from __future__ import annotations

import hashlib
import re
import secrets
import string

from serve_app.money import keyspace, lua
from serve_app.money.accounts import AccountError, Change, NotFound

TOKEN_PREFIX = "qbta_"
_ALPHABET = string.ascii_letters + string.digits
NAME = re.compile(r"^[A-Za-z0-9._@-]{1,64}$")

CREATE_LUA = lua.script(lua.CLOCK, lua.AUDIT, """
redis.call('HSET', KEYS[1], 'name', ARGV[1], 'created_ms', now)
audit(ARGV[2], 'admin_token.create', ARGV[1], 'null', snapshot(KEYS[1]), ARGV[3])
return 1
""")

REVOKE_LUA = lua.script(lua.CLOCK, lua.AUDIT, """
local found = 0
for _, k in ipairs(KEYS) do
  if redis.call('HGET', k, 'name') == ARGV[1] then
    local before = snapshot(k)
    redis.call('DEL', k)
    audit(ARGV[2], 'admin_token.revoke', ARGV[1], before, 'null', ARGV[3])
    found = found + 1
  end
end
return found
""")


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def create(r, name: str, change: Change = Change()) -> str:
    """A new admin token for `name`; the token itself is not stored anywhere."""
    if not NAME.match(name):
        raise AccountError("an admin token's name has 1-64 letters, digits or ._@-")
    token = TOKEN_PREFIX + "".join(secrets.choice(_ALPHABET) for _ in range(40))
    r.eval(CREATE_LUA, 1, keyspace.admin_token(token_hash(token)), name, change.actor, change.request_id)
    return token


def actor(r, authorization: str | None) -> str | None:
    """The token's name from `Authorization: Bearer qbta_...`, or None."""
    scheme, _, token = (authorization or "").strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token.startswith(TOKEN_PREFIX) or len(token) > 200:
        return None
    return r.hget(keyspace.admin_token(token_hash(token)), "name")


def names(r) -> list[dict]:
    out = []
    for k in r.scan_iter(match=keyspace.ADMIN_TOKEN_PREFIX + "*", count=1000):
        t = r.hgetall(k)
        if t:
            out.append({"name": t.get("name"), "created_ms": int(t.get("created_ms", 0))})
    return sorted(out, key=lambda t: (t["name"] or "", t["created_ms"]))


def revoke(r, name: str, change: Change = Change()) -> int:
    """Revokes every token of that name."""
    records = list(r.scan_iter(match=keyspace.ADMIN_TOKEN_PREFIX + "*", count=1000))
    found = r.eval(REVOKE_LUA, len(records), *records, name, change.actor, change.request_id) if records else 0
    if not found:
        raise NotFound(f"no admin token named {name!r}")
    return int(found)
