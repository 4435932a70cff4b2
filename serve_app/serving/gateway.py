"""The ingress, undecorated: the HTTP routes over the request path, built from the service config and the model
deployments' handles. Serve wraps it (`serving/ingress.py`); tests build it from fakes or the simulated engine,
without Ray, as Ray Serve LLM does with its own ingress."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from serve_app.api.encoding import dumps
from serve_app.api.errors import ApiError
from serve_app.api.http import EXCEPTION_HANDLERS, JSON, error_response
from serve_app.api.throttle import AuthFailures, TokenizerCalls
from serve_app.config.service import ServiceConfig
from serve_app.money import keyspace
from serve_app.money.billing import Billing
from serve_app.safety.moderator import Moderator
from serve_app.safety.policy import GuardPolicy
from serve_app.safety.stage import SafetyStage
from serve_app.serving.access import authenticated_key
from serve_app.serving.completions import CompletionPath
from serve_app.serving.endpoints import Chat, Completions
from serve_app.serving.tokenizing import TokenizerRoutes
from serve_app.serving.routing import ModelRouter
from serve_app.telemetry.metrics import IngressMetrics


HEALTH_FRESH_S = 1.0  # how long one round of /health's checks answers for


class Gateway:
    def __init__(self, config: ServiceConfig, router: ModelRouter, billing: Billing, safety: SafetyStage,
                 metrics: IngressMetrics, ping: Callable[[], Any], clock: Callable[[], float] = time.time,
                 ledger=None):
        self.config = config
        self.ledger = ledger  # the exporter's handle (health shows its backlog), None without Serve
        self.router = router
        self.billing = billing
        self.ping = ping
        self.auth_failures = AuthFailures(config.auth_failure_limit, config.auth_failure_window_s)

        def path(endpoint) -> CompletionPath:
            return CompletionPath(router, billing, safety, metrics, max_body_bytes=config.max_body_bytes,
                                  first_item_timeout_s=config.first_item_timeout_s, max_request_s=config.max_request_s,
                                  body_read_s=config.body_read_s, max_sequences=config.max_sequences, clock=clock,
                                  auth_failures=self.auth_failures, endpoint=endpoint,
                                  stream_relay=config.stream_transport == "relay")

        self.completions, self.chat = path(Completions), path(Chat)
        self.tokenizer = TokenizerRoutes(router, billing, self.auth_failures,
                                         TokenizerCalls(config.tokenizer_rpm, 60), config.max_body_bytes,
                                         config.body_read_s)
        self._created = int(clock())
        self._health: asyncio.Future | None = None  # the round of checks callers of /health share
        self._health_at = 0.0

    @classmethod
    def build(cls, config: ServiceConfig, handles: dict[str, Any], redis=None, metrics=None, ledger=None) -> Gateway:
        """Everything from the config: the router over the handles, money on Redis, the guard if configured."""
        router = ModelRouter(config.models, handles, config.catalog_models, config.replica_wait_s,
                             config.scale_from_zero_wait_s)
        redis = redis if redis is not None else keyspace.async_client(config.redis_url)
        metrics = metrics if metrics is not None else IngressMetrics()
        safety = SafetyStage(None)
        if config.guard is not None:
            g = config.guard
            safety = SafetyStage(Moderator(router.routes[g.model], g.timeout_s, metrics),
                                 GuardPolicy(g.default_mode, g.block_controversial, g.fail_open),
                                 g.stream_window_tokens, metrics)
        billing = Billing.on(redis, config.default_rpm, config.default_tpm, config.reservation_ttl_s,
                             config.delivery_checkpoint_s, config.default_concurrency)
        return cls(config, router, billing, safety, metrics, redis.ping, ledger=ledger)

    async def drain(self, timeout_s: float) -> int:
        """Waits for both paths' settlements still running, and money's own releases (the ingress is stopping); how
        many did not finish."""
        left = await asyncio.gather(self.completions.drain(timeout_s), self.chat.drain(timeout_s),
                                    self.billing.drain(timeout_s))
        return sum(left)

    def app(self) -> Starlette:
        return Starlette(routes=[Route("/v1/completions", self.completions, methods=["POST"]),
                                 Route("/v1/chat/completions", self.chat, methods=["POST"]),
                                 Route("/v1/models", self.models, methods=["GET"]),
                                 Route("/v1/credits", self.credits, methods=["GET"]),
                                 Route("/tokenize", self.tokenizer.tokenize, methods=["POST"]),
                                 Route("/detokenize", self.tokenizer.detokenize, methods=["POST"]),
                                 Route("/health", self.health, methods=["GET"])],
                         exception_handlers=EXCEPTION_HANDLERS)

    async def models(self, request: Request) -> Response:
        """The models this key may call."""
        try:
            _, access = await authenticated_key(request, self.billing, self.auth_failures)
        except ApiError as exc:
            return error_response(exc)
        data = [{"id": r.spec.id, "object": "model", "created": self._created, "owned_by": "qubittron",
                 "category": r.spec.category.value, "max_model_len": r.spec.max_model_len, "endpoints": r.endpoints}
                for r in self.router.routes.values() if r.endpoints and access.allows(r.spec.id)]
        return Response(dumps({"object": "list", "data": data}), media_type=JSON)

    async def credits(self, request: Request) -> Response:
        """The key's account: balance, what in-flight requests hold, and what is available (decimal strings)."""
        try:
            key, _ = await authenticated_key(request, self.billing, self.auth_failures)
            found = await self.billing.credits(key)
        except ApiError as exc:
            return error_response(exc)
        return Response(dumps(found.as_dict()), media_type=JSON)

    async def health(self, request: Request) -> Response:
        """200 only when every model deployment answers its engine health check and Redis answers. Models that
        scale from zero are not probed (a probe would wake them) and show as `on_demand`. It needs no key, so its
        callers share one round of checks, at most one a second: a flood of it cannot queue health checks in front
        of the models' paying requests."""
        now = time.monotonic()
        if self._health is None or (self._health.done() and now - self._health_at >= HEALTH_FRESH_S):
            self._health, self._health_at = asyncio.ensure_future(self._checks()), now
        body, healthy = await asyncio.shield(self._health)
        return Response(dumps(body), status_code=200 if healthy else 503, media_type=JSON)

    async def _checks(self) -> tuple[dict, bool]:
        names = [n for n, r in self.router.routes.items() if not r.spec.scales_from_zero]
        checks = [self.router.routes[n].health.remote() for n in names]
        checks.append(self.ping())
        if self.ledger is not None:
            checks.append(self.ledger.lag.remote())
        results = await asyncio.gather(*(asyncio.wait_for(_awaited(c), self.config.health_timeout_s)
                                         for c in checks), return_exceptions=True)
        lag = results.pop() if self.ledger is not None else None
        status = {n: "ok" if not isinstance(r, BaseException) else "unavailable" for n, r in zip(names, results)}
        status["redis"] = "ok" if not isinstance(results[-1], BaseException) else "unavailable"
        healthy = all(v == "ok" for v in status.values())
        status.update({n: "on_demand" for n, r in self.router.routes.items() if r.spec.scales_from_zero})
        body = {"status": "ok" if healthy else "unavailable", "components": status}
        if self.ledger is not None:  # reported, not gating: a stalled export delays the ledger, not the service
            body["ledger_export"] = "unavailable" if isinstance(lag, BaseException) else lag
        return body, healthy


async def _awaited(x):
    return await x
