"""The KubeRay `RayService` for the prod profile, generated from the catalog.

The head pod runs the Serve controller, the HTTP proxy and the ingress replicas but no model replicas (it has no
GPUs, and every model replica asks for one); the ingress is pinned to it by a node label (the prod profile's
`ingress.label_selector`, given to the head's `ray start --labels`), so that it never takes a GPU node's CPUs. One
GPU worker group per accelerator type, sized from the catalog's autoscaling bounds; KubeRay's in-tree autoscaler
adds pods when Serve's new replicas cannot be placed. Redis's URL comes from a Secret, never from the manifest.

The ledger exporter runs beside the ingress, so on the head; a PostgreSQL ledger's password is the Secret
`qbt-postgres` (key `password`), mounted read-only on the head alone, in the directory of the profile's
`ledger.password_file` (the file name is the key's path), never in env, argv or the manifest. GPU workers do not get
it. `qbt config build` fails where the prod ledger is PostgreSQL and the password could not reach it that way.
"""

from __future__ import annotations

import math
from pathlib import PurePosixPath

import yaml

from serve_app.config.catalog import Catalog
from serve_app.config.paths import CLUSTER
from serve_app.config.service import ServiceConfig

MANIFEST = CLUSTER / "kuberay" / "rayservice.yaml"
RAY_VERSION = "2.60.0"
IMAGE = "ghcr.io/qubittron/qubittron-serve:0.1.0-gpu"
REDIS_SECRET = {"name": "qbt-redis", "key": "url"}
POSTGRES_SECRET = {"name": "qbt-postgres", "key": "password"}
SECRET_FILE_MODE = 0o400
# The group of the image's `ray` user (rayproject/ray: uid 1000, gid 100). A Secret's files belong to root; with the
# pod's fsGroup the kubelet gives them this group and group read (0400 becomes 0440), so that Ray can read them.
RAY_GID = 100
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


def ledger_secret(config: ServiceConfig) -> tuple[dict, dict] | None:
    """The head's volume and volume mount of the ledger's PostgreSQL password, or None for a SQLite ledger. Raises
    ValueError (`qbt config build` fails) where the password could not reach the exporter through the mount."""
    ledger = config.ledger
    if ledger.kind != "postgresql":
        return None
    secret = f"Secret {POSTGRES_SECRET['name']} (key {POSTGRES_SECRET['key']})"
    if ledger.password_file is None:
        raise ValueError("the prod profile's ledger is PostgreSQL but has no password_file: set service.ledger."
                         "password_file in cluster/catalog.yaml (e.g. /etc/qbt/postgres/password); the head mounts "
                         f"{secret} in its directory")
    path = PurePosixPath(ledger.password_file)
    if not path.is_absolute() or ".." in path.parts or path.parent == PurePosixPath("/"):
        raise ValueError(f"the prod profile's ledger.password_file {str(path)!r} must be an absolute path in a "
                         f"directory of its own (e.g. /etc/qbt/postgres/password): the head mounts {secret} there")
    if not config.ingress.label_selector:
        raise ValueError("the prod profile's ledger is PostgreSQL but its ingress has no label_selector: the ledger "
                         f"exporter runs beside the ingress, and only the head (which the selector picks) mounts "
                         f"{secret}")
    volume = {"name": POSTGRES_SECRET["name"], "secret": {
        "secretName": POSTGRES_SECRET["name"], "defaultMode": SECRET_FILE_MODE,
        "items": [{"key": POSTGRES_SECRET["key"], "path": path.name, "mode": SECRET_FILE_MODE}]}}
    mount = {"name": POSTGRES_SECRET["name"], "mountPath": str(path.parent), "readOnly": True}
    return volume, mount


def head_group(config: ServiceConfig) -> dict:
    labels = config.ingress.label_selector
    params = {"num-cpus": str(HEAD_CPUS), "dashboard-host": "0.0.0.0", "metrics-export-port": "8080"}
    if labels:
        params["labels"] = ",".join(f"{k}={v}" for k, v in sorted(labels.items()))
    container = {
        "name": "ray-head", "image": IMAGE, "env": _env(),
        "ports": [{"containerPort": 6379, "name": "gcs"}, {"containerPort": 8265, "name": "dashboard"},
                  {"containerPort": 10001, "name": "client"}, {"containerPort": 8000, "name": "serve"},
                  {"containerPort": 8080, "name": "metrics"}],
        "resources": _resources(HEAD_CPUS, "16Gi")}
    spec: dict = {"containers": [container]}
    secret = ledger_secret(config)
    if secret is not None:
        volume, mount = secret
        container["volumeMounts"] = [mount]
        spec["volumes"] = [volume]
        spec["securityContext"] = {"fsGroup": RAY_GID}
    return {"rayStartParams": params, "template": {"spec": spec}}


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
                "headGroupSpec": head_group(catalog.service_config("prod")),
                "workerGroupSpecs": worker_groups(catalog),
            },
        },
    }


def render(catalog: Catalog, serve_config: dict) -> str:
    data = manifest(catalog, serve_config)
    header = ("# Generated from cluster/catalog.yaml by `qbt config build --profile prod`; do not edit.\n"
              "# Needs Secrets qbt-redis (key url: the Redis URL)")
    secret = ledger_secret(catalog.service_config("prod"))
    if secret is not None:
        header += (f", {POSTGRES_SECRET['name']} (key {POSTGRES_SECRET['key']}: the ledger database's password,\n"
                   f"# mounted read-only on the head alone, in {secret[1]['mountPath']})")
    header += " and optionally hf-token (key token).\n"
    return header + yaml.safe_dump(data, sort_keys=False, width=120)
