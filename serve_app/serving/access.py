"""Who may call the authenticated but unmetered routes (`/v1/models`, `/v1/credits`, the tokenizer endpoints): one
rule for all of them. The key is looked up every time (a revoked key is refused at once); an address that keeps
sending invalid keys is throttled before the lookup, unless its key was seen recently (customers behind the same
address as a key guesser keep working)."""

from __future__ import annotations

from starlette.requests import Request

from serve_app.api.errors import ApiError, Code
from serve_app.api.throttle import AuthFailures, client_address
from serve_app.money import keys
from serve_app.money.admission import KeyAccess


async def authenticated_key(request: Request, billing, auth_failures: AuthFailures) -> tuple[str, KeyAccess]:
    """The request's API key once it is known to be valid, and what it may call; raises the contract's ApiError
    otherwise."""
    address = client_address(request.scope)
    try:
        key = keys.bearer_key(request.headers.get("authorization"))
        if not billing.recent(key):
            auth_failures.check(address)
        return key, await billing.authenticate(key)
    except ApiError as exc:
        if exc.code is Code.INVALID_API_KEY:
            auth_failures.failed(address)
        raise
