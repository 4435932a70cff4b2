"""The model router: model id -> that model's Serve deployment handles, spec and tokenizer; unknown ids are `model_not_found`; a model
without a replica to take the request answers within a bounded wait."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any

from ray.serve.exceptions import BackPressureError

from deployments import tokenizers
from deployments.wire import InvalidSampling

from serve_app.api.errors import ApiError, Code, invalid, upstream
from serve_app.config.service import ModelSpec


log = logging.getLogger("qbt.routing")
RETRY_COLD_S, RETRY_UPSTREAM_S, RETRY_QUEUE_FULL_S = 30, 5, 1
# Plain pickle for what crosses to and from the model replicas (deployments/wire.py: importable types; stream items
# are plain tuples, about a microsecond each way): Serve's default, cloudpickle, costs far more per streamed item.
WIRE = {"request_serialization": "pickle", "response_serialization": "pickle"}


@dataclass(slots=True)
class ModelRoute:
    spec: ModelSpec
    stream: Any
    complete: Any
    health: Any
    tokenizer: Any
    wait_s: float

    @property
    def chat(self) -> bool:
        """Chat completions need the model's chat template, from its tokenizer's configuration (or mistral_common)."""
        return tokenizers.serves_chat(self.tokenizer)

    def check_priority(self, priority: int | None) -> None:
        if priority is not None and self.spec.engine_args.get("scheduling_policy") != "priority":
            raise ApiError(Code.INVALID_REQUEST, f"priority is not enabled for the model '{self.spec.id}' (its engine "
                           "schedules first come, first served).", "priority")

    @property
    def endpoints(self) -> list[str]:
        return [e for e, served in (("completions", self.spec.completions), ("chat.completions", self.chat)) if served]

    async def assigned(self, response) -> None:
        """Waits until Serve hands the request to a replica. Serve's handle queues a request for as long as no
        replica can take it (all dead, or a node lost, or scaled to zero); bounded here, so that such a model
        answers 502 `upstream_error` (503 with Retry-After while it scales up from zero), never hangs.

        Uses the handle's own assignment future (Ray 2.60; `tests/unit` checks it is still there)."""
        try:
            await asyncio.wait_for(response._fetch_future_result_async(), self.wait_s)
        except (asyncio.TimeoutError, TimeoutError):
            response.cancel()
            raise self.unavailable() from None
        except BackPressureError:
            raise self.queue_full() from None

    def failure(self, exc: BaseException) -> ApiError:
        """An exception from the model's deployment (or the guard, or the relay's socket) as the contract's error."""
        if isinstance(exc, ApiError):
            return exc
        if isinstance(exc, InvalidSampling):
            return invalid(str(exc).splitlines()[0][:500], None)
        if isinstance(exc, (asyncio.TimeoutError, TimeoutError)):
            return upstream(f"The model '{self.spec.id}' did not start answering in time.")
        log.error("upstream failure for %s: %s", self.spec.id, exc)
        return upstream(f"The model '{self.spec.id}' is unavailable or failed ({type(exc).__name__}).")

    def queue_full(self) -> ApiError:
        """Every replica is busy and `max_queued_requests` wait already: refused at once, never queued."""
        return ApiError(Code.SERVICE_UNAVAILABLE, f"The model '{self.spec.id}' is at capacity "
                        f"({self.spec.queue_limit} requests already waiting); retry shortly.",
                        headers={"Retry-After": str(RETRY_QUEUE_FULL_S)})

    def unavailable(self) -> ApiError:
        if self.spec.scales_from_zero:
            return ApiError(Code.SERVICE_UNAVAILABLE, f"The model '{self.spec.id}' is scaling up from zero "
                            "replicas; retry shortly.", headers={"Retry-After": str(RETRY_COLD_S)})
        return ApiError(Code.UPSTREAM_ERROR, f"No replica of the model '{self.spec.id}' could take the request "
                        f"within {self.wait_s:g}s (replicas lost, restarting or saturated); retry shortly.",
                        headers={"Retry-After": str(RETRY_UPSTREAM_S)})


class ModelRouter:
    def __init__(self, specs: list[ModelSpec], handles: dict[str, Any], catalog_models: list[str] = (),
                 replica_wait_s: float = 30, scale_from_zero_wait_s: float = 60):
        self.catalog_models = set(catalog_models)
        self.routes: dict[str, ModelRoute] = {}
        for spec in specs:
            handle = handles[spec.id]
            self.routes[spec.id] = ModelRoute(
                spec=spec,
                stream=handle.options(stream=True, method_name="stream", **WIRE),
                complete=handle.options(method_name="complete", **WIRE),
                health=handle.options(method_name="check_health", **WIRE),
                tokenizer=load_tokenizer(spec),
                wait_s=scale_from_zero_wait_s if spec.scales_from_zero else replica_wait_s,
            )

    def route(self, model: str, chat: bool = False) -> ModelRoute:
        route = self.routes.get(model)
        if route is None and model in self.catalog_models:
            raise ApiError(Code.MODEL_NOT_FOUND, f"The model '{model}' is in the catalog but not deployed on this "
                           f"cluster; GET /v1/models lists the served models.", "model")
        if route is None:
            raise ApiError(Code.MODEL_NOT_FOUND, f"The model '{model}' does not exist or is not served here; "
                           f"GET /v1/models lists the served models.", "model")
        if chat and not route.chat:
            raise ApiError(Code.MODEL_NOT_FOUND, f"The model '{model}' does not support chat completions (its "
                           "tokenizer has no chat template).", "model")
        if not chat and not route.spec.completions:
            raise ApiError(Code.MODEL_NOT_FOUND, f"The model '{model}' does not support completions.", "model")
        return route


def load_tokenizer(spec: ModelSpec):
    """The ingress tokenizes once (for the context check and the reservation) and sends token ids on: with the
    engine's own tokenizer (`deployments/tokenizers.py`)."""
    return tokenizers.load_tokenizer(spec.weights_path(), spec.engine_args, spec.simulated)
