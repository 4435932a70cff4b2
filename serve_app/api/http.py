"""HTTP plumbing shared by every route: bounded JSON bodies, error responses, and the last-resort handlers that
keep every failure inside the contract's envelope (never a traceback, never a bare 500)."""

from __future__ import annotations

import json
import logging
import re

from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response

from serve_app.api.errors import ApiError, Code, invalid, upstream

log = logging.getLogger("qbt.http")
JSON = "application/json"


async def read_json(request: Request, limit: int):
    """The body parsed as JSON, refused as soon as it passes `limit` bytes (declared or streamed)."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise invalid(f"The request body is larger than {limit} bytes", None)
    body = bytearray()
    try:
        async for part in request.stream():
            body += part
            if len(body) > limit:
                raise invalid(f"The request body is larger than {limit} bytes", None)
    except ClientDisconnect:  # the client left (or its framing broke) mid-body: nobody is there to answer
        raise invalid("The client disconnected before the request body arrived", None) from None
    try:
        payload = json.loads(body.decode("utf-8"))  # strict: encoded surrogates are not UTF-8
    except (ValueError, RecursionError):
        raise invalid("The request body is not valid JSON (UTF-8)", None) from None
    if SURROGATE_ESCAPE.search(body) and not _encodable(payload):
        raise invalid("The request body contains an unpaired UTF-16 surrogate escape (\\ud800-\\udfff)", None)
    return payload


# A JSON escape of a UTF-16 surrogate: pairs are valid (clients escape emoji so), a lone one is no character.
SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89abcdefABCDEF]")


def _encodable(payload) -> bool:
    try:
        json.dumps(payload, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def error_response(exc: ApiError, headers: dict | None = None) -> Response:
    """Serve (its proxy, or the ingress replica's own HTTP server) adds `x-request-id` (the client's own, or one it
    generates) to every response."""
    out = dict(headers or {})
    out.update(exc.headers)
    return Response(exc.body(), status_code=exc.status, headers=out, media_type=JSON)


async def http_exception(request: Request, exc: HTTPException) -> Response:
    if exc.status_code == 405:
        return Response(ApiError(Code.INVALID_REQUEST, f"Method {request.method} is not allowed on "
                                 f"{request.url.path}").body(), status_code=405, media_type=JSON)
    return error_response(ApiError(Code.NOT_FOUND, f"No route {request.method} {request.url.path}"))


async def unexpected(request: Request, exc: Exception) -> Response:
    log.exception("unexpected error on %s", request.url.path)
    return error_response(upstream("The service failed to handle the request; retry it."))


EXCEPTION_HANDLERS = {HTTPException: http_exception, Exception: unexpected}
