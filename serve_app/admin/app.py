"""The admin HTTP API and the operator console: accounts, keys, usage and the audit log, for platform operators.

It is its own process on its own port (`qbt admin serve`, started by `qbt serve` on 127.0.0.1), never on the public
port; every call carries an admin token, and every change goes through the same functions as the `qbt` CLI
(`money/accounts.py`, `money/keyring.py`), each one script that appends its audit row. Redis and the ledger database
are synchronous clients, called in Starlette's thread pool."""

from __future__ import annotations

import re
import threading
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.middleware import Middleware
from starlette.middleware.base import BaseHTTPMiddleware
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from serve_app.admin import audit, tokens
from serve_app.api.errors import ApiError, Code, invalid
from serve_app.api.http import EXCEPTION_HANDLERS, error_response, read_json
from serve_app.api.throttle import AuthFailures, client_address
from serve_app.ledger import reports
from serve_app.ledger.database import Database
from serve_app.money import accounts, keyring, keys
from serve_app.money.accounts import AccountError, Change, Conflict, NotFound

CONSOLE = Path(__file__).parent / "console"
MAX_BODY = 64 * 1024
AUDIT_ID = re.compile(r"[0-9]{1,20}(-[0-9]{1,20})?")  # a Redis stream entry id
SECURITY_HEADERS = {"Content-Security-Policy": "default-src 'self'; frame-ancestors 'none'",
                    "X-Frame-Options": "DENY", "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer",
                    "Cache-Control": "no-store"}


class Admin:
    """The handlers, over one Redis client and one ledger database (used by one thread at a time)."""

    def __init__(self, redis, database: Database, known_models: set[str] | None = None):
        self.redis = redis
        self.database = database
        self.known_models = known_models
        self._db_lock = threading.Lock()
        self.failures = AuthFailures()

    # -- plumbing --
    async def _call(self, request: Request, fn: Callable[..., Any], *args, **kwargs) -> Any:
        try:
            return await run_in_threadpool(fn, *args, **kwargs)
        except NotFound as e:
            raise ApiError(Code.NOT_FOUND, str(e)) from None
        except Conflict as e:
            raise ApiError(Code.CONFLICT, str(e)) from None
        except (AccountError, ValueError) as e:
            raise invalid(str(e)) from None

    def _reports(self, fn: Callable[..., Any], *args, **kwargs) -> Any:
        with self._db_lock:
            return fn(self.database, *args, **kwargs)

    def _change(self, request: Request) -> Change:
        return Change(actor=f"admin:{request.state.actor}", request_id=request.state.request_id)

    # -- accounts --
    async def list_accounts(self, request: Request) -> Response:
        return _list(await self._call(request, accounts.list_accounts, self.redis))

    async def create_account(self, request: Request) -> Response:
        body = await _body(request, {"name": str, "credits_usd": (str, int, float)}, required=("name",))
        created = await self._call(request, accounts.create_account, self.redis, body["name"],
                                   str(body.get("credits_usd", "0")), self._change(request))
        return JSONResponse(created, status_code=201)

    async def show_account(self, request: Request) -> Response:
        return JSONResponse(await self._call(request, accounts.show_account, self.redis,
                                             request.path_params["name"]))

    async def topup(self, request: Request) -> Response:
        body = await _body(request, {"usd": (str, int, float)}, required=("usd",))
        idempotency = request.headers.get("idempotency-key")
        return JSONResponse(await self._call(request, accounts.topup, self.redis, request.path_params["name"],
                                             str(body["usd"]), idempotency, self._change(request)))

    # -- keys --
    async def list_keys(self, request: Request) -> Response:
        return _list(await self._call(request, keyring.list_keys, self.redis, request.query_params.get("account")))

    async def create_key(self, request: Request) -> Response:
        body = await _body(request, None, required=("account",))
        account = body.pop("account")
        if not isinstance(account, str):
            raise invalid("account must be a string", "account")
        if unknown := sorted(set(body) - set(keyring.KeySpec.model_fields)):
            raise invalid(f"Unknown field '{unknown[0]}'", unknown[0])
        change = self._change(request)

        def create() -> dict:
            key, kid = keyring.create_key(self.redis, account, change, self.known_models, **body)
            return {"key": key, **keyring.show_key(self.redis, kid)}

        return JSONResponse(await self._call(request, create), status_code=201)

    async def revoke_key(self, request: Request) -> Response:
        kid = _key_id(request)
        change = self._change(request)

        def revoke() -> dict:
            keyring.revoke_key(self.redis, kid, change)
            return keyring.show_key(self.redis, kid)

        return JSONResponse(await self._call(request, revoke))

    async def rotate_key(self, request: Request) -> Response:
        body = await _body(request, {"grace_s": int}, required=())
        key, view = await self._call(request, keyring.rotate_key, self.redis, _key_id(request),
                                     int(body.get("grace_s", 3600)), self._change(request))
        return JSONResponse({"key": key, **view})

    # -- the ledger --
    async def usage(self, request: Request) -> Response:
        return _list(await self._usage(request))

    async def usage_csv(self, request: Request) -> Response:
        text = reports.usage_csv(await self._usage(request))
        return Response(text, media_type="text/csv; charset=utf-8",
                        headers={"Content-Disposition": 'attachment; filename="usage.csv"'})

    async def _usage(self, request: Request) -> list[dict]:
        q = request.query_params
        group_by = await self._call(request, reports.GroupBy.parse, q.get("group_by"))
        return await self._call(request, self._reports, reports.usage, group_by, _ms(q, "since"), _ms(q, "until"),
                                q.get("account") or None)

    async def recent_requests(self, request: Request) -> Response:
        q = request.query_params
        return _list(await self._call(request, self._reports, reports.recent, _limit(q), q.get("account") or None))

    async def audit_log(self, request: Request) -> Response:
        q = request.query_params
        before = q.get("before") or None
        if before is not None and not AUDIT_ID.fullmatch(before):
            raise invalid("'before' must be an audit entry's id (as `id` shows it, for example 1700000000000-0)",
                          "before")
        return _list(await self._call(request, audit.recent, self.redis, _limit(q), before))

    async def me(self, request: Request) -> Response:
        return JSONResponse({"actor": request.state.actor})

    # -- the console --
    async def console(self, request: Request) -> Response:
        return FileResponse(CONSOLE / "index.html", media_type="text/html")

    async def healthz(self, request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    # -- the app --
    def routes(self) -> list:
        v1 = "/admin/v1"
        return [
            Route("/", self.console), Route("/healthz", self.healthz),
            Mount("/console", app=StaticFiles(directory=CONSOLE, check_dir=False), name="console"),
            Route(f"{v1}/me", self.me),
            Route(f"{v1}/accounts", self.list_accounts, methods=["GET"]),
            Route(f"{v1}/accounts", self.create_account, methods=["POST"]),
            Route(f"{v1}/accounts/{{name}}", self.show_account, methods=["GET"]),
            Route(f"{v1}/accounts/{{name}}/topup", self.topup, methods=["POST"]),
            Route(f"{v1}/keys", self.list_keys, methods=["GET"]),
            Route(f"{v1}/keys", self.create_key, methods=["POST"]),
            Route(f"{v1}/keys/{{key_id}}/revoke", self.revoke_key, methods=["POST"]),
            Route(f"{v1}/keys/{{key_id}}/rotate", self.rotate_key, methods=["POST"]),
            Route(f"{v1}/usage", self.usage), Route(f"{v1}/usage.csv", self.usage_csv),
            Route(f"{v1}/requests", self.recent_requests), Route(f"{v1}/audit", self.audit_log),
        ]

    async def authenticate(self, request: Request, call_next) -> Response:
        """Every `/admin/` call needs an admin token; request ids are the caller's `x-request-id` or new ones."""
        given = request.headers.get("x-request-id", "")
        request.state.request_id = given if given and len(given) <= 128 and given.isprintable() else (
            "req_" + uuid.uuid4().hex)
        headers = {**SECURITY_HEADERS, "x-request-id": request.state.request_id}
        try:
            if request.url.path.startswith("/admin/"):
                address = client_address(request.scope)
                self.failures.check(address)
                actor = await run_in_threadpool(tokens.actor, self.redis, request.headers.get("authorization"))
                if actor is None:
                    self.failures.failed(address)
                    raise ApiError(Code.INVALID_API_KEY, "Missing or invalid admin token: send 'Authorization: "
                                   "Bearer qbta_...' (create one with `qbt admin tokens create --name NAME`).")
                request.state.actor = actor
            response = await call_next(request)
        except ApiError as e:
            response = error_response(e)
        except Exception as e:  # Redis down, mostly: the envelope, never a traceback
            if type(e).__module__.startswith("redis"):
                response = error_response(ApiError(Code.SERVICE_UNAVAILABLE, "Redis is unreachable; retry shortly.",
                                                   headers={"Retry-After": "5"}))
            else:
                raise
        response.headers.update(headers)
        return response


def build_admin_app(redis, database: Database, known_models: set[str] | None = None) -> Starlette:
    admin = Admin(redis, database, known_models)
    app = Starlette(routes=admin.routes(), middleware=[Middleware(BaseHTTPMiddleware, dispatch=admin.authenticate)],
                    exception_handlers={**EXCEPTION_HANDLERS, ApiError: lambda request, e: error_response(e)})
    app.state.admin = admin
    return app


async def _body(request: Request, types: dict[str, Any] | None, required: tuple[str, ...]) -> dict:
    body = await read_json(request, MAX_BODY)
    if not isinstance(body, dict):
        raise invalid("The request body must be a JSON object")
    for name in required:
        if name not in body:
            raise invalid(f"'{name}' is required", name)
    if types is not None:
        for name, value in body.items():
            if name not in types:
                raise invalid(f"Unknown field '{name}'", name)
            if isinstance(value, bool) or not isinstance(value, types[name]):
                raise invalid(f"'{name}' has the wrong type", name)
    return body


def _key_id(request: Request) -> str:
    kid = request.path_params["key_id"]
    if not keys.is_key_id(kid):
        raise ApiError(Code.NOT_FOUND, f"no such key id {kid[:32]!r}")
    return kid


def _ms(q, name: str) -> int | None:
    text = q.get(name)
    if not text:
        return None
    try:
        when = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise invalid(f"'{name}' must be an ISO 8601 date or time", name) from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return int(when.timestamp() * 1000)


def _limit(q) -> int:
    text = q.get("limit", "50")
    if not (text.isascii() and text.isdigit() and 1 <= int(text) <= 1000):
        raise invalid("'limit' must be between 1 and 1000", "limit")
    return int(text)


def _list(data: list) -> Response:
    return JSONResponse({"object": "list", "data": data})
