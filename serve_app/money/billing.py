"""The request path's two money seams: reserve the worst case before any work, settle what was produced after it.
The rules of both live here or in the scripts, never in the request path."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from deployments.wire import Usage
from serve_app.api.chat_protocol import ChatCompletionRequest
from serve_app.api.protocol import CompletionRequest
from serve_app.money import keys
from serve_app.money.admission import Admission, Admitter, Credits, KeyAccess, PriceRates
from serve_app.money.leases import Leases
from serve_app.money.settlement import Settlement, Settler
from serve_app.money.status import Status

log = logging.getLogger("qbt.billing")


def completion_budget(req: CompletionRequest | ChatCompletionRequest, prompts: int) -> int:
    """The worst case the reservation covers: every candidate of every prompt runs to max_tokens."""
    return req.max_tokens_or_default * req.candidates_per_prompt * prompts


KNOWN_S = 60  # a key admitted or authenticated this recently skips the check before the body is read
KNOWN_MAX = 100_000


class Billing:
    def __init__(self, admitter: Admitter, settler: Settler, leases: Leases):
        self.admitter = admitter
        self.settler = settler
        self.leases = leases
        self._known: dict[str, float] = {}  # key hash -> until when it is taken as known (admission re-checks)
        self._releasing: set[asyncio.Task] = set()  # admissions whose request went away while they were in flight

    @classmethod
    def on(cls, redis, default_rpm: int, default_tpm: int, reservation_ttl_s: float, checkpoint_s: float = 2.0,
           default_concurrency: int = 0) -> Billing:
        return cls(Admitter(redis, default_rpm, default_tpm, reservation_ttl_s, default_concurrency), Settler(redis),
                   Leases(redis, reservation_ttl_s, checkpoint_s))

    async def authenticate(self, key: str) -> KeyAccess:
        """Always one lookup (a revoked key is refused at once); the key then counts as seen recently."""
        digest = keys.key_hash(key)
        access = await self.admitter.key_access(digest)
        self._remember(digest)
        return access

    def recent(self, key: str) -> bool:
        """Seen (admitted or authenticated) in the last KNOWN_S: the address throttle lets it through."""
        return self._known.get(keys.key_hash(key), 0) > time.monotonic()

    async def credits(self, key: str) -> Credits:
        return await self.admitter.credits(keys.key_hash(key))

    async def known(self, key: str, before_lookup: Callable[[], None] | None = None) -> None:
        """Before a request's body is read: a key seen recently passes at once; any other is authenticated (one
        Redis trip), so an unknown key costs no body parsing or tokenizing. Admission checks every key again.
        `before_lookup` runs only for a key not seen recently (the auth-failure throttle: it may raise)."""
        digest = keys.key_hash(key)
        if self._known.get(digest, 0) > time.monotonic():
            return
        if before_lookup is not None:
            before_lookup()
        await self.admitter.authenticate(digest)
        self._remember(digest)

    def _remember(self, digest: str) -> None:
        self._known.pop(digest, None)
        self._known[digest] = time.monotonic() + KNOWN_S
        if len(self._known) > KNOWN_MAX:
            self._known.pop(next(iter(self._known)))

    async def admit(self, key: str, completion_id: str, request_id: str, model: str, prices: PriceRates,
                    req: CompletionRequest, prompt_ids: list[list[int]], safety_model: bool = False) -> Admission:
        """Authenticates, applies the key's rate limits and reserves the worst-case cost, in one Redis trip.
        The trip runs to its end even when the request is cancelled meanwhile (its client gone): a reservation the
        script made is then released at once, rather than holding the money and the key's concurrency slot until
        its deadline."""
        digest = keys.key_hash(key)
        trip = asyncio.ensure_future(self.admitter.admit(digest, completion_id, request_id, model, prices,
                                                         sum(len(p) for p in prompt_ids),
                                                         completion_budget(req, len(prompt_ids)), safety_model))
        try:
            admission = await asyncio.shield(trip)
        except asyncio.CancelledError:
            trip.add_done_callback(self._release_unclaimed)
            raise
        self.leases.hold(admission)  # renewed (and a stream's delivery checkpointed) while the request runs
        self._remember(digest)
        return admission

    def _release_unclaimed(self, trip: asyncio.Task) -> None:
        """Settles, as disconnected and with nothing produced (so charged nothing), an admission nobody awaits."""
        if trip.cancelled() or trip.exception() is not None:  # nothing reserved (a refusal, Redis unreachable)
            return
        task = asyncio.get_running_loop().create_task(self.settle(trip.result(), Usage(), Status.DISCONNECTED))
        self._releasing.add(task)
        task.add_done_callback(self._released)

    def _released(self, task: asyncio.Task) -> None:
        self._releasing.discard(task)
        if not task.cancelled() and task.exception() is not None:  # the reservation's deadline reconciles it
            log.warning("releasing an admission whose request went away failed: %r", task.exception())

    async def drain(self, timeout_s: float) -> int:
        """Waits for the releases still running (the ingress is stopping); returns how many did not finish."""
        pending = set(self._releasing)
        if pending:
            _, pending = await asyncio.wait(pending, timeout=timeout_s)
        return len(pending)

    async def settle(self, admission: Admission, usage: Usage, status: Status) -> int | None:
        """Charges `usage` when the status pays (Status.charged), releases the rest; the micro-dollars charged."""
        try:
            return await self.settler.settle(Settlement(
                admission.completion_id, usage.prompt_tokens, usage.completion_tokens, status, admission.account,
                admission.key_id, admission.model, admission.input_micros, admission.output_micros,
                admission.request_id))
        finally:
            self.leases.release(admission.completion_id)
