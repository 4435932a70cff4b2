"""The seed's error table and the OpenAI error envelope: `{"error": {"message", "type", "param", "code"}}`."""

from __future__ import annotations

import json
from enum import Enum


class Code(str, Enum):
    INVALID_REQUEST = "invalid_request"
    MODEL_NOT_FOUND = "model_not_found"
    INVALID_API_KEY = "invalid_api_key"
    INSUFFICIENT_FUNDS = "insufficient_funds"
    RATE_LIMIT_EXCEEDED = "rate_limit_exceeded"
    UPSTREAM_ERROR = "upstream_error"
    SERVICE_UNAVAILABLE = "service_unavailable"
    NOT_FOUND = "not_found"
    CONTENT_FILTER = "content_filter"
    CONFLICT = "conflict"  # the admin API: the thing exists already, or an idempotency key was used otherwise


STATUS = {
    Code.INVALID_REQUEST: 400,
    Code.MODEL_NOT_FOUND: 400,
    Code.INVALID_API_KEY: 401,
    Code.INSUFFICIENT_FUNDS: 402,
    Code.NOT_FOUND: 404,
    Code.CONTENT_FILTER: 400,
    Code.CONFLICT: 409,
    Code.RATE_LIMIT_EXCEEDED: 429,
    Code.UPSTREAM_ERROR: 502,
    Code.SERVICE_UNAVAILABLE: 503,
}

TYPES = {
    Code.INVALID_REQUEST: "invalid_request_error",
    Code.MODEL_NOT_FOUND: "invalid_request_error",
    Code.INVALID_API_KEY: "authentication_error",
    Code.INSUFFICIENT_FUNDS: "insufficient_funds",
    Code.NOT_FOUND: "invalid_request_error",
    Code.CONTENT_FILTER: "invalid_request_error",
    Code.CONFLICT: "invalid_request_error",
    Code.RATE_LIMIT_EXCEEDED: "rate_limit_error",
    Code.UPSTREAM_ERROR: "upstream_error",
    Code.SERVICE_UNAVAILABLE: "service_unavailable",
}


class ApiError(Exception):
    """Raised anywhere on the request path; the ingress renders it as the envelope with its HTTP status."""

    def __init__(self, code: Code, message: str, param: str | None = None,
                 headers: dict[str, str] | None = None, detail: dict | None = None):
        super().__init__(message)
        self.code = code
        self.message = message
        self.param = param
        self.headers = headers or {}
        self.detail = detail or {}

    @property
    def status(self) -> int:
        return STATUS[self.code]

    def envelope(self) -> dict:
        return {"error": {"message": self.message, "type": TYPES[self.code], "param": self.param,
                          "code": self.code.value, **self.detail}}

    def body(self) -> bytes:
        return json.dumps(self.envelope()).encode()


def invalid(message: str, param: str | None = None) -> ApiError:
    return ApiError(Code.INVALID_REQUEST, message, param)


def upstream(message: str) -> ApiError:
    return ApiError(Code.UPSTREAM_ERROR, message)
