"""The KubeRay `RayService` for the prod profile, generated from the catalog.

Production runs what is benchmarked: Ray Serve's throughput-optimized mode with direct ingress, as `qbt serve` does
(serve_app/ops/launcher.py). Every Ray container's env has SERVE_ENV, which replicas read at import (gRPC handles,
user code on the replica's loop, direct ingress; a serveConfig runtime_env would not reach the controller). The one
ingress replica, on the head, serves HTTP itself on SERVE_PORT, no proxy hop: the head's env gives the Serve
controller the port range [SERVE_PORT, SERVE_PORT + 1) and no port quarantine, so a restarted ingress gets SERVE_PORT
back at once (it binds with SO_REUSEPORT, serving/ingress.py). Serve's drain keeps its default (30 s): a stopping
ingress answers /-/healthz with 503 so that traffic leaves it first. Serve forces its proxy onto the head, on the
profile's http.port (8001: internal, no containerPort, no NetworkPolicy rule). `check_direct_ingress` fails the build
for a prod profile that would not run this way.

The entry point is the Service GATEWAY_NAME (cluster/kuberay/gateway-service.yaml, for the load balancer or Ingress):
the head's SERVE_PORT while KubeRay's `ray.io/serve` label says its ingress answers /-/healthz (the operator probes
the active and a pending cluster's head: during a zero-downtime upgrade the new head joins once its ingress answers).
KubeRay's `<name>-serve-svc` is NOT the entry point in this mode: it selects the worker pods too, where nothing
listens on SERVE_PORT; so the GPU workers get an explicit readinessProbe (the raylet's health, as KubeRay checks it),
since KubeRay's default one would wait for SERVE_PORT as well. Scaling the ingress out means a CPU worker group
labelled qubittron.io/role=gateway with one ingress replica per pod (not done here); benchmarks/gateway.py measures
what one ingress replica carries.

The head pod runs the Serve controller, the proxy and the ingress replica but no model replicas (it has no GPUs, and
every model replica asks for one); the ingress is pinned to it by a node label (the prod profile's
`ingress.label_selector`, given to the head's `ray start --labels`), so that it never takes a GPU node's CPUs. One
GPU worker group per accelerator type, sized from the catalog's autoscaling bounds; KubeRay's in-tree autoscaler
adds pods when Serve's new replicas cannot be placed. Redis's URL comes from a Secret, never from the manifest.

The ledger exporter runs beside the ingress, so on the head; a PostgreSQL ledger's password is the Secret
`qbt-postgres` (key `password`), mounted read-only on the head alone, in the directory of the profile's
`ledger.password_file` (the file name is the key's path), never in env, argv or the manifest. GPU workers do not get
it. (Of the RayService's pods, the head alone: the admin API's own Deployment, `cluster/kuberay/admin.yaml`, holds
both Secrets too, the same way.) `qbt config build` fails where the prod ledger is PostgreSQL and the password could
not reach it that way.

Hardening ("a cluster nobody can take over"):
- Ray token authentication: `rayClusterConfig.authOptions` (mode token, secretName `qbt-ray-token`, key `auth_token`).
  This is KubeRay's own wiring (1.6+), and the only one under which the operator can still talk to the dashboard: its
  dashboard client reads that Secret to authenticate the serveConfigV2 submission and the health checks. Each Ray
  container also declares `RAY_AUTH_MODE=token` and `RAY_AUTH_TOKEN` (secretKeyRef) itself, exactly what the operator
  would inject, so the manifest says so. A file with `RAY_AUTH_TOKEN_PATH` would buy nothing: the operator injects
  the env var into every container that lacks it, and every Ray process of the pod must hold the token anyway.
- Redis's URL (its password) is in the env of the head only, where the ingress and the ledger exporter run (pinned by
  the ingress label selector); model replicas (deployments/) never touch Redis, so GPU workers get no REDIS_URL.
- Ports: the head container declares the Serve port (8000, the only one meant for outside), the GCS (6379, for the
  workers), the dashboard (8265: the operator finds it by this port's name) and metrics (8080); no Ray client (10001).
- NetworkPolicy, in the separate generated file cluster/kuberay/networkpolicy.yaml (a List, `kubectl apply -f` it in
  the RayService's namespace): every Ray pod (selected by POD_LABEL, which this template sets: KubeRay's own
  `ray.io/cluster` label carries the generated RayCluster name, `qubittron-serve-xxxxx`, which changes on upgrades)
  takes traffic on any port from Ray pods of the same service (Ray picks node manager, object manager and worker
  ports at random: KubeRay's own NetworkPolicy controller allows all ports inside a cluster too), the Serve port from
  SERVE_FROM (None: anywhere), metrics from the MONITORING_NAMESPACE, and the head's dashboard and Serve port (the
  `ray.io/serve` probe) from the KubeRay operator's pods in OPERATOR_NAMESPACE. Everything else (dashboard/Jobs API,
  GCS, Ray client, dashboard agent) is refused from outside the cluster's pods. Egress stays open (Redis,
  PostgreSQL, the model hub).
- securityContext on every container, the autoscaler sidecar's included (non-root uid 1000, no privilege
  escalation, no capabilities, RuntimeDefault seccomp); the pods' fsGroup 100 lets the `ray` user read Secret files.
- The image: IMAGE_DIGEST, when set, pins it by digest (operators should); the build refuses a `latest` or missing tag.
"""

from __future__ import annotations

import copy
import math
from pathlib import PurePosixPath

import yaml

from serve_app.config.catalog import Catalog
from serve_app.config.paths import CLUSTER
from serve_app.config.service import ServiceConfig

MANIFEST = CLUSTER / "kuberay" / "rayservice.yaml"
NETWORK_POLICY = CLUSTER / "kuberay" / "networkpolicy.yaml"
GATEWAY_SERVICE = CLUSTER / "kuberay" / "gateway-service.yaml"
NAME = "qubittron-serve"
GATEWAY_NAME = f"{NAME}-gateway"
RAY_VERSION = "2.60.0"
IMAGE_REPOSITORY = "ghcr.io/qubittron/qubittron-serve"
IMAGE_TAG = "0.1.0-gpu"
# Operators should pin the image by digest: set this to "sha256:<64 hex>" (the digest of the pushed IMAGE_TAG) and the
# manifest uses `repository@sha256:...`, which no re-push can change. None: we publish no digest yet, so the tag.
IMAGE_DIGEST: str | None = None
REDIS_SECRET = {"name": "qbt-redis", "key": "url"}
# KubeRay's authOptions.secretName: the operator reads the token from key `auth_token` (RAY_AUTH_TOKEN_SECRET_KEY).
RAY_TOKEN_SECRET = {"name": "qbt-ray-token", "key": "auth_token"}
POSTGRES_SECRET = {"name": "qbt-postgres", "key": "password"}
SECRET_FILE_MODE = 0o400
# The group of the image's `ray` user (rayproject/ray: uid 1000, gid 100). A Secret's files belong to root; with the
# pod's fsGroup the kubelet gives them this group and group read (0400 becomes 0440), so that Ray can read them.
RAY_GID = 100
RAY_UID = 1000
HEAD_CPUS = 4
SERVE_PORT, GCS_PORT, DASHBOARD_PORT, METRICS_PORT = 8000, 6379, 8265, 8080
AGENT_PORT = 52365  # the dashboard agent, which KubeRay's probes ask for the raylet's health
# Serve's throughput-optimized mode (direct ingress, gRPC handles), the one `qbt serve` sets (ops/launcher.py).
SERVE_ENV = {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1"}
# KubeRay's own readiness check of a worker without its Serve half (wget SERVE_PORT/-/healthz, which it adds where a
# template sets no probe): a GPU worker runs no ingress, nothing listens there, and it would never be Ready.
WORKER_READINESS = {
    "exec": {"command": ["bash", "-c", (f"wget -T 2 -q -O- http://localhost:{AGENT_PORT}/api/local_raylet_healthz"
                                        " | grep success")]},
    "initialDelaySeconds": 10, "periodSeconds": 5, "timeoutSeconds": 2, "failureThreshold": 10}
# Every Ray pod of this service carries this label (set on both templates); the NetworkPolicies select by it.
POD_LABEL = {"qubittron.io/ray-service": NAME}
# Where the KubeRay operator runs (the immutable namespace-name label) and its pods' label (the same in the Helm chart
# and kustomize installs); it reaches the head's dashboard to submit serveConfigV2 and poll Serve's status.
OPERATOR_NAMESPACE = "kuberay-system"
OPERATOR_POD_LABEL = {"app.kubernetes.io/component": "kuberay-operator"}
MONITORING_NAMESPACE = "monitoring"
# Who may reach the Serve port: None is anywhere (behind a TLS-terminating load balancer); a namespace selector's
# matchLabels (e.g. {"kubernetes.io/metadata.name": "ingress-nginx"}) narrows it to the ingress controller.
SERVE_FROM: dict | None = None
# readOnlyRootFilesystem stays false: Ray writes its session directory (/tmp/ray: logs, sockets, spilled objects),
# vLLM and Triton write compile caches under $HOME/.cache and Hugging Face downloads under $HOME; each needs an
# emptyDir that has not been sized or tested on the GPU nodes yet.
SECURITY_CONTEXT = {"runAsNonRoot": True, "runAsUser": RAY_UID, "runAsGroup": RAY_GID,
                    "allowPrivilegeEscalation": False, "readOnlyRootFilesystem": False,
                    "capabilities": {"drop": ["ALL"]}, "seccompProfile": {"type": "RuntimeDefault"}}


def image() -> str:
    """The Ray image, by digest where IMAGE_DIGEST is set. Raises ValueError for a mutable `latest` or missing tag."""
    return image_reference(IMAGE_REPOSITORY, IMAGE_TAG, IMAGE_DIGEST)


def image_reference(repository: str, tag: str | None, digest: str | None = None) -> str:
    if digest is not None:
        if not (digest.startswith("sha256:") and len(digest) == 71
                and all(c in "0123456789abcdef" for c in digest[7:])):
            raise ValueError(f"IMAGE_DIGEST {digest!r} is not sha256:<64 lowercase hex>")
        return f"{repository}@{digest}"
    if not tag or tag == "latest":
        raise ValueError(f"the image {repository} needs a fixed tag (not {tag or 'none'!r}), or better IMAGE_DIGEST")
    return f"{repository}:{tag}"


def _auth_env() -> list[dict]:
    """Ray token authentication: what KubeRay's authOptions would inject, declared so that the manifest says it."""
    return [{"name": "RAY_AUTH_MODE", "value": "token"},
            {"name": "RAY_AUTH_TOKEN", "valueFrom": {"secretKeyRef": dict(RAY_TOKEN_SECRET)}}]


def direct_ingress_env(ingress_replicas: int) -> dict[str, str]:
    """The Serve controller's (the head's) ports for the ingress replicas' own HTTP servers, [SERVE_PORT, SERVE_PORT +
    n) on each node, the lowest free one to a new replica; no quarantine of a dead replica's port (Serve holds it 150 s
    for HAProxy, not run here), so a restarted ingress is back on SERVE_PORT at once. The drain period is left alone."""
    return {"RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT": str(SERVE_PORT),
            "RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT": str(SERVE_PORT + ingress_replicas),
            "RAY_SERVE_PORT_QUARANTINE_S": "0"}


def check_direct_ingress(config: ServiceConfig, serve_config: dict) -> None:
    """Raises ValueError (`qbt config build` fails) where the prod profile would not serve through one direct-ingress
    replica on the head's SERVE_PORT, the gateway Service's target."""
    replicas, http = config.ingress.num_replicas, serve_config["http_options"]
    if replicas != 1:
        raise ValueError(f"the prod profile's ingress has num_replicas {replicas}: direct ingress runs one replica on "
                         f"the head, on port {SERVE_PORT}; scaling out needs a gateway worker group (kuberay.py)")
    if serve_config["proxy_location"] != "HeadOnly":
        raise ValueError("the prod profile's proxy_location must be HeadOnly: in direct-ingress mode Serve runs its "
                         "proxy on the head alone")
    if SERVE_PORT <= http["port"] < SERVE_PORT + replicas:
        raise ValueError(f"the prod profile's http.port {http['port']} is the ingress replica's: Serve's proxy "
                         f"listens on http.port, so use another (e.g. {SERVE_PORT + replicas})")
    if http["host"] != "0.0.0.0":
        raise ValueError(f"the prod profile's http.host {http['host']!r} must be 0.0.0.0: the ingress replica binds "
                         "it, and the gateway Service reaches it over the pod network")


def _env(redis: bool, serve: dict[str, str]) -> list[dict]:
    env = _auth_env() + [{"name": k, "value": v} for k, v in serve.items()]
    if redis:
        env.append({"name": "REDIS_URL", "valueFrom": {"secretKeyRef": dict(REDIS_SECRET)}})
    env.append({"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hf-token", "key": "token",
                                                                     "optional": True}}})
    return env


def security_context() -> dict:
    return dict(SECURITY_CONTEXT, capabilities={"drop": ["ALL"]}, seccompProfile={"type": "RuntimeDefault"})


def _container(name: str, redis: bool, serve: dict[str, str], **fields) -> dict:
    return {"name": name, "image": image(), "env": _env(redis, serve), **fields,
            "securityContext": security_context()}


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
    # The dashboard (and its Jobs API) listens on every interface because the KubeRay operator reaches it over the pod
    # network; token authentication and the NetworkPolicy (the operator and this cluster's pods only) guard it.
    params = {"num-cpus": str(HEAD_CPUS), "dashboard-host": "0.0.0.0", "metrics-export-port": str(METRICS_PORT)}
    if labels:
        params["labels"] = ",".join(f"{k}={v}" for k, v in sorted(labels.items()))
    # Only the Serve port is meant for outside; the GCS is for the workers, the dashboard for the operator (which finds
    # it by name on the head Service), metrics for Prometheus. No Ray client port (10001): nothing here uses it.
    container = _container(
        "ray-head", redis=True, serve={**SERVE_ENV, **direct_ingress_env(config.ingress.num_replicas)},
        ports=[{"containerPort": SERVE_PORT, "name": "serve"}, {"containerPort": GCS_PORT, "name": "gcs"},
               {"containerPort": DASHBOARD_PORT, "name": "dashboard"},
               {"containerPort": METRICS_PORT, "name": "metrics"}],
        resources=_resources(HEAD_CPUS, "16Gi"))
    spec: dict = {"containers": [container], "securityContext": {"fsGroup": RAY_GID}}
    secret = ledger_secret(config)
    if secret is not None:
        volume, mount = secret
        container["volumeMounts"] = [mount]
        spec["volumes"] = [volume]
    return {"rayStartParams": params, "template": {"metadata": {"labels": dict(POD_LABEL)}, "spec": spec}}


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
            "rayStartParams": {"num-cpus": str(acc.cpus_per_node - 2), "metrics-export-port": str(METRICS_PORT)},
            "template": {"metadata": {"labels": dict(POD_LABEL)}, "spec": {
                "containers": [_container(
                    "ray-worker", redis=False, serve=dict(SERVE_ENV),
                    resources=_resources(acc.cpus_per_node - 2, f"{acc.memory_gib_per_node - 16}Gi",
                                         acc.gpus_per_node),
                    readinessProbe=copy.deepcopy(WORKER_READINESS),
                    volumeMounts=[{"name": "dshm", "mountPath": "/dev/shm"}])],
                "volumes": [{"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "32Gi"}}],
                "securityContext": {"fsGroup": RAY_GID},
                "nodeSelector": {"nvidia.com/gpu.product": acc.product},
                "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]}},
        })
    return groups


def manifest(catalog: Catalog, serve_config: dict) -> dict:
    check_direct_ingress(catalog.service_config("prod"), serve_config)
    apps = {"applications": serve_config["applications"], "proxy_location": serve_config["proxy_location"],
            "http_options": serve_config["http_options"]}
    return {
        "apiVersion": "ray.io/v1",
        "kind": "RayService",
        "metadata": {"name": NAME, "labels": {"app.kubernetes.io/name": NAME}},
        "spec": {
            "serveConfigV2": yaml.safe_dump(apps, sort_keys=False, width=120),
            "rayClusterConfig": {
                "rayVersion": RAY_VERSION,
                "authOptions": {"mode": "token", "secretName": RAY_TOKEN_SECRET["name"]},
                "enableInTreeAutoscaling": True,
                # The autoscaler sidecar KubeRay adds to the head (the same image) gets the same securityContext.
                "autoscalerOptions": {"upscalingMode": "Default", "idleTimeoutSeconds": 600,
                                      "securityContext": security_context()},
                "headGroupSpec": head_group(catalog.service_config("prod")),
                "workerGroupSpecs": worker_groups(catalog),
            },
        },
    }


def render(catalog: Catalog, serve_config: dict) -> str:
    data = manifest(catalog, serve_config)
    header = ("# Generated from cluster/catalog.yaml by `qbt config build --profile prod`; do not edit.\n"
              f"# Needs Secrets {RAY_TOKEN_SECRET['name']} (key {RAY_TOKEN_SECRET['key']}: Ray's auth token, e.g. "
              f"`openssl rand -hex 32`),\n"
              "# qbt-redis (key url: the Redis URL, the head's env alone)")
    secret = ledger_secret(catalog.service_config("prod"))
    if secret is not None:
        header += (f", {POSTGRES_SECRET['name']} (key {POSTGRES_SECRET['key']}: the ledger database's password,\n"
                   f"# mounted read-only on the head alone, in {secret[1]['mountPath']})")
    header += " and optionally hf-token (key token).\n"
    header += (f"# Serve runs throughput-optimized with direct ingress: the entry point is the Service {GATEWAY_NAME}\n"
               f"# ({GATEWAY_SERVICE.name}), not KubeRay's {NAME}-serve-svc (it selects the workers, which serve "
               "nothing).\n")
    return header + _dump(data)


class _Dumper(yaml.SafeDumper):
    """No `&id001` anchors where two places of a manifest share a dict: each place is spelled out."""

    def ignore_aliases(self, data) -> bool:
        return True


def _dump(data: dict) -> str:
    return yaml.dump(data, Dumper=_Dumper, sort_keys=False, width=120)


def _policy(name: str, pod_selector: dict, rule: dict) -> dict:
    return {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": {"name": f"{NAME}-{name}", "labels": {"app.kubernetes.io/name": NAME}},
            "spec": {"podSelector": {"matchLabels": pod_selector}, "policyTypes": ["Ingress"], "ingress": [rule]}}


def _tcp(port: int) -> list[dict]:
    return [{"protocol": "TCP", "port": port}]


def network_policies() -> list[dict]:
    """Ingress rules for the Ray pods; NetworkPolicies add up, so a port none of them opens is closed."""
    pods = dict(POD_LABEL)
    serve: dict = {"ports": _tcp(SERVE_PORT)}
    if SERVE_FROM is not None:
        serve["from"] = [{"namespaceSelector": {"matchLabels": dict(SERVE_FROM)}}]
    operator = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": OPERATOR_NAMESPACE}},
                "podSelector": {"matchLabels": dict(OPERATOR_POD_LABEL)}}
    monitoring = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": MONITORING_NAMESPACE}}}
    return [
        # Ray's own traffic (GCS, raylets, object managers, workers, dashboard agents) on any port: Ray picks most of
        # them at random.
        _policy("ray-internal", pods, {"from": [{"podSelector": {"matchLabels": pods}}]}),
        _policy("serve", pods, serve),
        _policy("metrics", pods, {"from": [monitoring], "ports": _tcp(METRICS_PORT)}),
        # The operator submits Serve through the dashboard and sets the head's `ray.io/serve` label, which the
        # gateway Service follows, by probing SERVE_PORT/-/healthz: it needs that port even where SERVE_FROM is set.
        _policy("kuberay-operator", {**pods, "ray.io/node-type": "head"},
                {"from": [operator], "ports": _tcp(DASHBOARD_PORT) + _tcp(SERVE_PORT)}),
    ]


def render_network_policies() -> str:
    header = ("# Generated by `qbt config build --profile prod`; do not edit (see serve_app/config/kuberay.py).\n"
              f"# Apply in the RayService's namespace; needs a CNI that enforces NetworkPolicy. Only the Serve port "
              f"({SERVE_PORT}) is\n# open to {'anywhere' if SERVE_FROM is None else SERVE_FROM}; Ray's ports only "
              f"to this service's Ray pods, the dashboard also to the KubeRay\n# operator ({OPERATOR_NAMESPACE}), "
              f"metrics to {MONITORING_NAMESPACE}.\n")
    return header + _dump({"apiVersion": "v1", "kind": "List", "items": network_policies()})


def gateway_service() -> dict:
    """The entry point: the head's ingress replica, while the operator's `ray.io/serve` probe of its /-/healthz passes
    (a draining ingress answers 503 and leaves the endpoints before it stops)."""
    selector = {**POD_LABEL, "ray.io/node-type": "head", "ray.io/serve": "true"}
    return {"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": GATEWAY_NAME, "labels": {"app.kubernetes.io/name": NAME}},
            "spec": {"type": "ClusterIP", "selector": selector,
                     "ports": [{"name": "serve", "protocol": "TCP", "port": SERVE_PORT, "targetPort": SERVE_PORT}]}}


def render_gateway_service() -> str:
    header = ("# Generated by `qbt config build --profile prod`; do not edit (see serve_app/config/kuberay.py).\n"
              f"# The entry point for the load balancer or Ingress: the head's direct-ingress replica on {SERVE_PORT}. "
              f"KubeRay's\n# {NAME}-serve-svc is not: it selects the GPU workers too, where nothing serves in "
              "direct-ingress mode.\n")
    return header + _dump(gateway_service())
