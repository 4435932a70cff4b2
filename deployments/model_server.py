"""The per-model Serve deployment: each replica owns one engine (vLLM, or the simulated engine for `sim://`
models) and streams choice fragments back."""

from __future__ import annotations

import logging
import os
from collections.abc import AsyncIterator

from ray import serve

from deployments.heap import freeze_startup_heap
from deployments.relay import Progress, RelayServer, served
from deployments.wire import GenerationRequest
from serve_app.telemetry.logs import configure_logging
from serve_app.telemetry.tracing import context_from, tracer

log = logging.getLogger("qbt.model_server")


@serve.deployment(health_check_period_s=10, health_check_timeout_s=30, graceful_shutdown_timeout_s=20)
class ModelServer:
    async def __init__(self, model_id: str, weights_path: str, engine_kwargs: dict, simulation: dict | None = None):
        configure_logging(names=("qbt", "vllm"))
        from ray.serve.metrics import Counter

        self.tags = {"model": model_id}
        self.abandoned = Counter("qbt_engine_abandoned_tokens_total", "Tokens the engine generated for streams "
                                 "that ended before their end (client gone, prompt refused, request cut off).",
                                 tag_keys=("model",))
        self.abandoned_streams = Counter("qbt_engine_abandoned_streams_total", "Streams cancelled before their "
                                         "end (client gone, prompt refused, request cut off).", tag_keys=("model",))
        if simulation is not None:
            from deployments.sim_engine import SimConfig, SimEngine

            # A simulated death is a real one: the replica's process exits, as when a GPU node is lost.
            self.engine = SimEngine(model_id, SimConfig.model_validate(simulation), on_die=lambda: os._exit(1))
        else:
            from deployments.engine import Engine
            from deployments.stats import stat_loggers

            self.engine = Engine(weights_path, model_id, engine_kwargs, stat_loggers=stat_loggers())
        self.relayed = Counter("qbt_engine_relayed_streams_total", "Streams whose tokens after the first went on "
                               "the relay's socket (deployments/relay.py), not the Serve handle.", tag_keys=("model",))
        await self.engine.start()
        import ray

        self.relay = await RelayServer(ray.util.get_node_ip_address()).start()  # this node's address only
        freeze_startup_heap()  # no full collection walks vLLM, torch and Ray again (deployments/heap.py)

    async def stream(self, req: GenerationRequest) -> AsyncIterator[tuple]:
        """Items as `wire.outgoing` makes them; for a relayed stream, the first one with the relay's ticket, then
        the rest on the relay's socket (`relay.served`). Cancelling this generator (client gone, ingress gone) or
        the ingress closing the socket cancels the engine request, which frees its KV cache."""
        span = self._span(req)
        progress = Progress()
        try:
            async for raw in served(self.engine.stream(req), req, self.relay, progress):
                yield raw
        finally:
            if not progress.ended:  # work nobody will receive: what refusals and cut-offs cost the engine
                self.abandoned_streams.inc(tags=self.tags)
                if progress.produced:
                    self.abandoned.inc(progress.produced, tags=self.tags)
            if progress.relayed:
                self.relayed.inc(tags=self.tags)
            span.set_attribute("qbt.completion_tokens", progress.produced)
            span.end()

    async def complete(self, req: GenerationRequest):
        span = self._span(req)
        try:
            return await self.engine.complete(req)
        finally:
            span.end()

    @staticmethod
    def _span(req: GenerationRequest):
        return tracer().start_span("qbt.engine", context=context_from(req.trace_context),
                                   attributes={"qbt.completion_id": req.request_id, "qbt.prompts": len(req.prompts)})

    async def check_health(self) -> None:
        await self.engine.check_health()

    def __del__(self):
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.shutdown()
