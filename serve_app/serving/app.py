"""The Serve application builder: `import_path: serve_app.serving.app:build_app` in a Serve config, `args` a
ServiceConfig: one deployment per model (vLLM, or the simulated engine for `sim://` sources) behind the ingress."""

from __future__ import annotations

from typing import Any

from ray.serve import Application
from ray.serve.schema import LoggingConfig

from deployments.model_server import ModelServer
from serve_app.config.paths import ROOT
from serve_app.config.service import ModelSpec, ServiceConfig
from serve_app.ledger.deployment import LedgerExporter
from serve_app.serving.ingress import Ingress


# vLLM's own logging setup (logging.config.dictConfig) closes the handlers Ray Serve installed in the replica: the
# replica's log stops, and Serve's buffering handler, left without a target, keeps every access-log record (about
# 2 KiB per request, benchmarks/results/soak.md). vLLM's loggers go to Serve's handlers instead (configure_logging).
ENGINE_ENV = {"VLLM_CONFIGURE_LOGGING": "0"}


def placement(spec: ModelSpec) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """(actor options, deployment options, engine arguments) for the model's accelerators.

    One GPU: the replica actor holds it. Tensor parallel over N: a placement group of N GPU bundles on one node
    (STRICT_PACK), with vLLM's Ray executor placing its workers in it, as Ray Serve LLM does.
    """
    actor: dict[str, Any] = {"num_cpus": spec.num_cpus, "runtime_env": {"env_vars": {**ENGINE_ENV, **spec.env}}}
    options: dict[str, Any] = {}
    engine = spec.engine_kwargs()
    acc = spec.accelerator
    if acc is not None and acc.count == 1:
        if acc.is_gpu:
            actor.update(num_gpus=1, accelerator_type=acc.type)
        else:
            actor["resources"] = {acc.resource: 1}
    elif acc is not None:
        unit = {"GPU": 1, f"accelerator_type:{acc.type}": 0.001} if acc.is_gpu else {acc.resource: 1}
        options["placement_group_bundles"] = [{"CPU": spec.num_cpus, **unit}] + [
            dict(unit) for _ in range(acc.count - 1)]
        options["placement_group_strategy"] = "STRICT_PACK"
        engine["distributed_executor_backend"] = "ray"
    return actor, options, engine


def model_deployment(spec: ModelSpec, drain_s: float, logging: LoggingConfig) -> Application:
    """A replica being stopped (downscale, redeploy) gets no new requests and finishes the ones it runs for up to
    `drain_s`, the longest request allowed, before Serve ends it (Serve's default is 20 s)."""
    actor, options, engine = placement(spec)
    options.update(name=spec.deployment_name(), ray_actor_options=actor,
                   max_ongoing_requests=spec.max_ongoing_requests,
                   max_queued_requests=spec.queue_limit if spec.queue_limit is not None else -1,
                   graceful_shutdown_timeout_s=drain_s, logging_config=logging)
    if spec.autoscaling is not None:
        options["autoscaling_config"] = spec.autoscaling.model_dump(exclude_none=True)
    else:
        options["num_replicas"] = spec.num_replicas or 1
    simulation = spec.simulation.model_dump(mode="json") if spec.simulation is not None else None
    return ModelServer.options(**options).bind(spec.id, spec.weights_path(), engine, simulation)


def build_app(args: dict[str, Any]) -> Application:
    config = ServiceConfig.model_validate(args)
    logging = LoggingConfig(enable_access_log=config.serve_access_log)
    handles = {spec.id: model_deployment(spec, config.drain_s, logging) for spec in config.models}
    actor: dict[str, Any] = {"num_cpus": config.ingress.num_cpus}
    if config.ingress.label_selector:
        actor["label_selector"] = dict(config.ingress.label_selector)
    ingress = Ingress.options(
        num_replicas=config.ingress.num_replicas, max_ongoing_requests=config.ingress.max_ongoing_requests,
        ray_actor_options=actor, logging_config=logging)
    # Beside the ingress (on the head in production, where the database's credentials are mounted).
    exporter = LedgerExporter.options(ray_actor_options={**actor, "num_cpus": 0.1}).bind(
        config.ledger.resolved(ROOT).model_dump(mode="json"), config.redis_url)
    return ingress.bind(config.model_dump(mode="json"), handles, exporter)
