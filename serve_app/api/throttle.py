"""Repeated authentication failures from one client address are throttled before any other work: a client that
guesses keys (or sends large bodies with bad ones) gets 429 `rate_limit_exceeded` without a Redis trip, once it has
failed `limit` times within `window_s`. Per ingress replica, in memory, bounded: a best-effort brake, not a ban."""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable

from serve_app.api.errors import ApiError, Code

MAX_ADDRESSES = 100_000  # tracked at once; the oldest is forgotten first


class AuthFailures:
    def __init__(self, limit: int = 20, window_s: float = 10.0, clock: Callable[[], float] = time.monotonic):
        self.limit = limit
        self.window_s = window_s
        self.clock = clock
        self._seen: OrderedDict[str, list[float]] = OrderedDict()  # address -> [window start, failures]

    def check(self, address: str | None) -> None:
        """Raises 429 for an address over its limit in the current window."""
        entry = self._seen.get(address) if address else None
        if entry is None or entry[1] < self.limit:
            return
        left = entry[0] + self.window_s - self.clock()
        if left <= 0:
            del self._seen[address]
            return
        raise ApiError(Code.RATE_LIMIT_EXCEEDED, f"Too many requests with an invalid API key from this address; "
                       f"retry in {left:.0f} s with a valid key.", headers={"Retry-After": str(max(1, round(left)))})

    def failed(self, address: str | None) -> None:
        if not address:
            return
        now = self.clock()
        entry = self._seen.pop(address, None)
        if entry is None or now - entry[0] > self.window_s:
            entry = [now, 0]
        entry[1] += 1
        self._seen[address] = entry  # most recent last
        if len(self._seen) > MAX_ADDRESSES:
            self._seen.popitem(last=False)


def client_address(scope) -> str | None:
    """The peer's address as the ASGI server reports it (behind a trusted proxy, the forwarded client's)."""
    client = scope.get("client")
    return client[0] if client else None
