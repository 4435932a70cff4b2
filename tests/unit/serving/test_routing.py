"""The bounded wait for a replica: a model with no replica to take a request answers, it never hangs."""

from __future__ import annotations

import asyncio

import pytest

from serve_app.config.service import ModelSpec
from serve_app.api.errors import ApiError, Code
from serve_app.serving.routing import ModelRoute
from tests.support import SPEC


class Unassigned:
    """A handle response that Serve never gives to a replica (none alive, or scaled to zero)."""

    def __init__(self, delay_s: float | None = None):
        self.delay_s, self.cancelled = delay_s, False

    async def _fetch_future_result_async(self):
        await asyncio.sleep(3600 if self.delay_s is None else self.delay_s)
        return "replica-result"

    def cancel(self):
        self.cancelled = True


def route(**spec) -> ModelRoute:
    return ModelRoute(spec=ModelSpec.model_validate({**SPEC, **spec}), stream=None, complete=None, health=None,
                 tokenizer=None, wait_s=0.05)


def test_no_replica_is_upstream_error_with_retry_after():
    response = Unassigned()
    with pytest.raises(ApiError) as err:
        asyncio.run(route().assigned(response))
    assert err.value.code is Code.UPSTREAM_ERROR and err.value.status == 502
    assert "No replica of the model" in err.value.message and err.value.headers["Retry-After"]
    assert response.cancelled


def test_scaling_from_zero_is_503_with_retry_after():
    cold = route(autoscaling={"min_replicas": 0, "max_replicas": 1})
    with pytest.raises(ApiError) as err:
        asyncio.run(cold.assigned(Unassigned()))
    assert err.value.code is Code.SERVICE_UNAVAILABLE and err.value.status == 503
    assert err.value.headers["Retry-After"] == "30"


def test_an_assigned_request_passes_untouched():
    response = Unassigned(delay_s=0)
    asyncio.run(route().assigned(response))
    assert not response.cancelled


def test_serve_handles_still_expose_the_assignment_future():
    """Route.assigned relies on it; an upgrade of Ray that drops it must fail here, not hang in production."""
    from ray.serve.handle import DeploymentResponse, DeploymentResponseGenerator

    for cls in (DeploymentResponse, DeploymentResponseGenerator):
        assert asyncio.iscoroutinefunction(cls._fetch_future_result_async)


class QueueFull(Unassigned):
    """Serve's handle refusing a request: every replica busy and `max_queued_requests` already waiting."""

    async def _fetch_future_result_async(self):
        from ray.serve.exceptions import BackPressureError

        raise BackPressureError(num_queued_requests=4, max_queued_requests=4)


def test_a_full_queue_is_503_with_retry_after_at_once():
    with pytest.raises(ApiError) as err:
        asyncio.run(route(max_queued_requests=4).assigned(QueueFull()))
    assert err.value.code is Code.SERVICE_UNAVAILABLE and err.value.status == 503
    assert err.value.headers["Retry-After"] == "1" and "4 requests already waiting" in err.value.message


def test_model_replicas_are_bounded_and_drained_for_the_longest_request():
    from serve_app.config.service import ServiceConfig
    from serve_app.serving.app import build_app

    config = ServiceConfig.model_validate({"models": [{**SPEC, "max_queued_requests": 7}], "max_request_s": 600})
    app = build_app(config.model_dump(mode="json"))
    model = app._bound_deployment.init_args[1][SPEC["id"]]._bound_deployment
    assert model._deployment_config.max_queued_requests == 7
    assert model._deployment_config.graceful_shutdown_timeout_s == 600 + 30 == config.drain_s
    with pytest.raises(ValueError):
        ModelSpec.model_validate({**SPEC, "max_queued_requests": 0})
    assert ModelSpec.model_validate(SPEC).queue_limit == 128
    assert ModelSpec.model_validate({**SPEC, "category": "safety"}).queue_limit is None  # the guard's timeout bounds it
