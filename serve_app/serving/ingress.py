"""The ingress as a Serve deployment: a thin shell that builds the `Gateway` in the replica and hands Serve its
ASGI app. Everything it does is in `serving/gateway.py` and `serving/completions.py`."""

from __future__ import annotations

import logging

from ray import serve

from serve_app.config.service import ServiceConfig
from serve_app.serving.gateway import Gateway
from serve_app.telemetry.logs import configure_logging


log = logging.getLogger("qbt.ingress")
DRAIN_S = 15  # within Serve's graceful shutdown (20 s by default)


@serve.deployment(graceful_shutdown_timeout_s=20)
@serve.ingress()
class Ingress:
    def __init__(self, config: dict, handles: dict):
        configure_logging()
        self.gateway = Gateway.build(ServiceConfig.model_validate(config), handles)

    def __serve_build_asgi_app__(self):
        return self.gateway.app()

    async def __del__(self):
        """Serve awaits this when the replica stops: settlements still retrying get their chance to land."""
        left = await self.gateway.completions.drain(DRAIN_S)
        if left:
            log.error("%d settlements did not finish before the ingress stopped; their reservations will expire", left)
