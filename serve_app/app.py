"""The Serve application builder: `import_path: serve_app.app:build_app` in a Serve config, `args` a ServiceConfig."""

from __future__ import annotations

from typing import Any

from ray.serve import Application

from deployments.model_server import ModelServer
from serve_app.catalog import ModelSpec, ServiceConfig
from serve_app.ingress import Ingress


def model_deployment(spec: ModelSpec) -> Application:
    actor: dict[str, Any] = {"num_cpus": spec.num_cpus, "runtime_env": {"env_vars": dict(spec.env)}}
    if spec.num_gpus:
        actor["num_gpus"] = spec.num_gpus
    if spec.accelerator_type:
        actor["accelerator_type"] = spec.accelerator_type
    options: dict[str, Any] = {"name": spec.deployment_name(), "ray_actor_options": actor,
                               "max_ongoing_requests": spec.max_ongoing_requests}
    if spec.autoscaling is not None:
        options["autoscaling_config"] = spec.autoscaling.model_dump(exclude_none=True)
    else:
        options["num_replicas"] = spec.num_replicas or 1
    return ModelServer.options(**options).bind(spec.id, spec.weights_path(), spec.engine_kwargs())


def build_app(args: dict[str, Any]) -> Application:
    config = ServiceConfig.model_validate(args)
    handles = {spec.id: model_deployment(spec) for spec in config.models}
    ingress = Ingress.options(
        num_replicas=config.ingress.num_replicas, max_ongoing_requests=config.ingress.max_ongoing_requests,
        ray_actor_options={"num_cpus": config.ingress.num_cpus})
    return ingress.bind(config.model_dump(mode="json"), handles)
