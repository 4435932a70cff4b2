"""API keys: `qbt_` plus 40 random base62 characters, shown once, stored only as their SHA-256; and the one place
the `Authorization` header is parsed."""

from __future__ import annotations

import hashlib
import secrets
import string

from serve_app.api.errors import ApiError, Code

KEY_PREFIX = "qbt_"
_ALPHABET = string.ascii_letters + string.digits
_KEY_LENGTH = 40


def new_key() -> str:
    return KEY_PREFIX + "".join(secrets.choice(_ALPHABET) for _ in range(_KEY_LENGTH))


def key_hash(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def key_id(key_hash_hex: str) -> str:
    """The public name of a key in logs, the ledger and `qbt keys list`; not enough to use the key."""
    return "key_" + key_hash_hex[:12]


def is_key_id(text: str) -> bool:
    return len(text) == 16 and text.startswith("key_") and all(c in "0123456789abcdef" for c in text[4:])


def bearer_key(authorization: str | None) -> str:
    """The key from `Authorization: Bearer qbt_...`; anything else is 401 before Redis is asked."""
    if not authorization:
        raise ApiError(Code.INVALID_API_KEY, "Missing API key: send 'Authorization: Bearer qbt_<key>'.")
    scheme, _, token = authorization.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token.startswith(KEY_PREFIX) or len(token) > 200:
        raise ApiError(Code.INVALID_API_KEY, "Invalid API key: expected 'Authorization: Bearer qbt_<key>'.")
    return token
