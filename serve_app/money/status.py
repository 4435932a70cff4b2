"""How a request ended: the one vocabulary of the ledger row, the request log and the metrics, and the rule of
which endings pay for the tokens produced."""

from __future__ import annotations

from enum import Enum

from serve_app.api.errors import Code


class Status(str, Enum):
    OK = "ok"
    DISCONNECTED = "disconnected"  # the client left mid-request: what was produced was delivered or paid for
    OUTPUT_FILTERED = "output_filtered"  # the output guard withheld text the engine produced
    INTERRUPTED = "interrupted"  # the stream failed after text reached the client: it pays for what it received
    TIMED_OUT = "timed_out"  # a stream cut off at the request bound after text left (or its client stopped reading)
    EXPIRED = "expired"  # reconciled by admission after the reservation's deadline
    REFUSED = "refused"  # refused before admission (metrics and request log only; no ledger row)
    # Errors after admission carry the contract's code (each has a ledger row, charged nothing).
    INVALID_REQUEST = Code.INVALID_REQUEST.value
    MODEL_NOT_FOUND = Code.MODEL_NOT_FOUND.value
    INVALID_API_KEY = Code.INVALID_API_KEY.value
    INSUFFICIENT_FUNDS = Code.INSUFFICIENT_FUNDS.value
    RATE_LIMIT_EXCEEDED = Code.RATE_LIMIT_EXCEEDED.value
    UPSTREAM_ERROR = Code.UPSTREAM_ERROR.value
    SERVICE_UNAVAILABLE = Code.SERVICE_UNAVAILABLE.value
    NOT_FOUND = Code.NOT_FOUND.value
    CONTENT_FILTER = Code.CONTENT_FILTER.value

    @classmethod
    def of(cls, code: Code) -> Status:
        return cls(code.value)

    @property
    def charged(self) -> bool:
        """Endings that pay for the tokens produced; every other ending is charged nothing."""
        return self in CHARGED

    @property
    def code(self) -> str | None:
        """The error code this ending reports, or None for the endings that are not errors."""
        if self in (Status.INTERRUPTED, Status.TIMED_OUT):
            return Code.UPSTREAM_ERROR.value
        return None if self in CHARGED else self.value


CHARGED = frozenset({Status.OK, Status.DISCONNECTED, Status.OUTPUT_FILTERED, Status.INTERRUPTED, Status.TIMED_OUT})
