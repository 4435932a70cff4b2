"""The ingress as a Serve deployment: a thin shell that builds the `Gateway` in the replica and hands Serve its
ASGI app. Everything it does is in `serving/gateway.py` and `serving/completions.py`."""

from __future__ import annotations

import logging

from ray import serve

from deployments.heap import freeze_startup_heap
from serve_app.config.service import ServiceConfig
from serve_app.serving.gateway import Gateway
from serve_app.telemetry.logs import configure_logging


log = logging.getLogger("qbt.ingress")
DRAIN_S = 15  # within Serve's graceful shutdown (30 s, below), after the requests in flight


def rebind_after_a_crash() -> None:
    """Serve's direct ingress binds the service port without SO_REUSEPORT, so the successor of a killed ingress
    replica cannot bind while the dead one's connections sit in TIME_WAIT (60 s), and Serve then blocks the port
    for good: the service would stay down (tests/faults). Bound with SO_REUSEPORT, as Serve's own proxy binds, the
    new replica takes the port at once. Ports stay one per replica (Serve's port manager), so none is shared."""
    from ray.serve._private import replica

    original = replica.start_asgi_http_server
    if getattr(original, "qbt_reuseport", False):
        return

    async def start_asgi_http_server(app, http_options, **kwargs):
        return await original(app, http_options, **{**kwargs, "enable_so_reuseport": True})

    start_asgi_http_server.qbt_reuseport = True
    replica.start_asgi_http_server = start_asgi_http_server


@serve.deployment(graceful_shutdown_timeout_s=30)
@serve.ingress()
class Ingress:
    def __init__(self, config: dict, handles: dict, ledger=None):
        configure_logging()
        rebind_after_a_crash()  # Serve starts the replica's HTTP server after this constructor
        self.gateway = Gateway.build(ServiceConfig.model_validate(config), handles, ledger=ledger)
        freeze_startup_heap()  # no full collection walks the tokenizers and Ray again (deployments/heap.py)

    def __serve_build_asgi_app__(self):
        return self.gateway.app()

    async def __del__(self):
        """Serve awaits this when the replica stops: settlements still retrying get their chance to land."""
        left = await self.gateway.drain(DRAIN_S)
        if left:
            log.error("%d settlements did not finish before the ingress stopped; their reservations will expire", left)
