"""The KubeRay `RayService` for the prod profile, generated from the catalog.

The head pod runs the Serve controller, the HTTP proxy and the ingress replicas but no model replicas (it has no
GPUs, and every model replica asks for one); the ingress is pinned to it by a node label (the prod profile's
`ingress.label_selector`, given to the head's `ray start --labels`), so that it never takes a GPU node's CPUs. One
GPU worker group per accelerator type, sized from the catalog's autoscaling bounds; KubeRay's in-tree autoscaler
adds pods when Serve's new replicas cannot be placed. Redis's URL comes from a Secret, never from the manifest.
"""

from __future__ import annotations

import math

import yaml

from serve_app.config.catalog import Catalog
from serve_app.config.paths import CLUSTER

MANIFEST = CLUSTER / "kuberay" / "rayservice.yaml"
RAY_VERSION = "2.60.0"
IMAGE = "ghcr.io/qubittron/qubittron-serve:0.1.0-gpu"
REDIS_SECRET = {"name": "qbt-redis", "key": "url"}
HEAD_CPUS = 4


def _env() -> list[dict]:
    return [{"name": "REDIS_URL", "valueFrom": {"secretKeyRef": REDIS_SECRET}},
            {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hf-token", "key": "token",
                                                                 "optional": True}}}]


def _resources(cpu: int | str, memory: str, gpus: int = 0) -> dict:
    limits = {"cpu": str(cpu), "memory": memory}
    if gpus:
        limits["nvidia.com/gpu"] = str(gpus)
    return {"requests": dict(limits), "limits": limits}


def head_group(labels: dict[str, str]) -> dict:
    params = {"num-cpus": str(HEAD_CPUS), "dashboard-host": "0.0.0.0", "metrics-export-port": "8080"}
    if labels:
        params["labels"] = ",".join(f"{k}={v}" for k, v in sorted(labels.items()))
    return {
        "rayStartParams": params,
        "template": {"spec": {"containers": [{
            "name": "ray-head", "image": IMAGE, "env": _env(),
            "ports": [{"containerPort": 6379, "name": "gcs"}, {"containerPort": 8265, "name": "dashboard"},
                      {"containerPort": 10001, "name": "client"}, {"containerPort": 8000, "name": "serve"},
                      {"containerPort": 8080, "name": "metrics"}],
            "resources": _resources(HEAD_CPUS, "16Gi")}]}},
    }


def worker_groups(catalog: Catalog) -> list[dict]:
    groups = []
    for acc_type, acc in catalog.accelerators.items():
        models = [m for m in catalog.models if m.accelerator and m.accelerator.type == acc_type]
        if not models:
            continue
        low = sum(m.accelerator.count * (m.autoscaling.min_replicas if m.autoscaling else m.num_replicas or 1)
                  for m in models)
        high = sum(m.accelerator.count * (m.autoscaling.max_replicas if m.autoscaling else m.num_replicas or 1)
                   for m in models)
        nodes_min, nodes_max = math.ceil(low / acc.gpus_per_node), max(1, math.ceil(high / acc.gpus_per_node))
        groups.append({
            "groupName": f"gpu-{acc_type.lower()}",
            "replicas": nodes_min, "minReplicas": nodes_min, "maxReplicas": nodes_max,
            "rayStartParams": {"num-cpus": str(acc.cpus_per_node - 2), "metrics-export-port": "8080"},
            "template": {"spec": {
                "containers": [{
                    "name": "ray-worker", "image": IMAGE, "env": _env(),
                    "resources": _resources(acc.cpus_per_node - 2, f"{acc.memory_gib_per_node - 16}Gi",
                                            acc.gpus_per_node),
                    "volumeMounts": [{"name": "dshm", "mountPath": "/dev/shm"}]}],
                "volumes": [{"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "32Gi"}}],
                "nodeSelector": {"nvidia.com/gpu.product": acc.product},
                "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]}},
        })
    return groups


def manifest(catalog: Catalog, serve_config: dict) -> dict:
    apps = {"applications": serve_config["applications"], "proxy_location": serve_config["proxy_location"],
            "http_options": serve_config["http_options"]}
    return {
        "apiVersion": "ray.io/v1",
        "kind": "RayService",
        "metadata": {"name": "qubittron-serve", "labels": {"app.kubernetes.io/name": "qubittron-serve"}},
        "spec": {
            "serveConfigV2": yaml.safe_dump(apps, sort_keys=False, width=120),
            "rayClusterConfig": {
                "rayVersion": RAY_VERSION,
                "enableInTreeAutoscaling": True,
                "autoscalerOptions": {"upscalingMode": "Default", "idleTimeoutSeconds": 600},
                "headGroupSpec": head_group(catalog.service_config("prod").ingress.label_selector),
                "workerGroupSpecs": worker_groups(catalog),
            },
        },
    }


def render(catalog: Catalog, serve_config: dict) -> str:
    header = ("# Generated from cluster/catalog.yaml by `qbt config build --profile prod`; do not edit.\n"
              "# Needs Secrets qbt-redis (key url: the Redis URL) and optionally hf-token (key token).\n")
    return header + yaml.safe_dump(manifest(catalog, serve_config), sort_keys=False, width=120)
