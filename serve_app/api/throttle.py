"""In-memory brakes per ingress replica, bounded, checked without a Redis trip: repeated authentication failures
from one client address (a client that guesses keys, or sends large bodies with bad ones, gets 429
`rate_limit_exceeded` once it has failed `limit` times within `window_s`), and the free tokenizer endpoints' calls
per key. Best effort, not a ban: one ingress replica serves production (direct ingress), so it is the cluster's."""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable

from serve_app.api.errors import ApiError, Code

MAX_ADDRESSES = 100_000  # tracked at once; the oldest is forgotten first


class WindowCounter:
    """At most `limit` events per subject within a fixed window that starts at the subject's first event."""

    message = "Too many requests; retry in {left} s."

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
        raise ApiError(Code.RATE_LIMIT_EXCEEDED, self.message.format(left=f"{left:.0f}"),
                       headers={"Retry-After": str(max(1, round(left)))})

    def count(self, address: str | None) -> None:
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


class AuthFailures(WindowCounter):
    message = "Too many requests with an invalid API key from this address; retry in {left} s with a valid key."

    def failed(self, address: str | None) -> None:
        self.count(address)


class TokenizerCalls(WindowCounter):
    message = "Too many tokenizer requests for this key; retry in {left} s."


def client_address(scope) -> str | None:
    """The peer's address as the ASGI server reports it (behind a trusted proxy, the forwarded client's)."""
    client = scope.get("client")
    return client[0] if client else None
