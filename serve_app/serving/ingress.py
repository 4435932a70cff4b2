"""The ingress as a Serve deployment: a thin shell that builds the `Gateway` in the replica and hands Serve its
ASGI app. Everything it does is in `serving/gateway.py` and `serving/completions.py`."""

from __future__ import annotations

from ray import serve

from serve_app.config.service import ServiceConfig
from serve_app.serving.gateway import Gateway
from serve_app.telemetry.logs import configure_logging


@serve.deployment
@serve.ingress()
class Ingress:
    def __init__(self, config: dict, handles: dict):
        configure_logging()
        self.gateway = Gateway.build(ServiceConfig.model_validate(config), handles)

    def __serve_build_asgi_app__(self):
        return self.gateway.app()
