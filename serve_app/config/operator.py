"""The admin API and operator console on the cluster (cluster/kuberay/admin.yaml), generated for the prod profile.

`qbt admin serve` moves money and mints keys, so it never sits behind the public gateway: it runs as its own
Deployment (the RayService's image, none of Ray's pods or labels, so none of Ray's NetworkPolicies or the PodMonitor
select it) behind a ClusterIP Service. Operators reach it with `kubectl port-forward`, which NetworkPolicies do not
filter; in-cluster callers need ADMIN_CLIENT_LABEL on their pods. Every API call (/admin/v1/) wants an admin token.

It reads what the head reads: REDIS_URL from the same Secret key, the prod ledger's PostgreSQL URL from the catalog
and its password from the qbt-postgres Secret, mounted read-only in the same directory (kuberay.ledger_secret), never
in env or argv. A SQLite ledger would live on the head's disk, out of this pod's reach, so the build refuses it.

The containers' securityContext is the Ray containers' plus a read-only root filesystem: Ray's reasons to keep it
writable (its session directory, vLLM's caches, model downloads) do not apply, and the server writes no file (traced:
only bytecode caches, which Python skips when it cannot write them). Egress is closed but for Redis, PostgreSQL (the
ledger URL's port) and DNS, on their ports to any address: either store may be in the cluster or a managed service.
Ray's GCS shares Redis's port, but Ray's own NetworkPolicies admit only Ray pods to it.
"""

from __future__ import annotations

from urllib.parse import urlsplit

import yaml

from serve_app.config import kuberay
from serve_app.config.catalog import Catalog
from serve_app.config.paths import CLUSTER

MANIFEST = CLUSTER / "kuberay" / "admin.yaml"
NAME = f"{kuberay.NAME}-admin"
PORT = 8101  # `qbt admin serve`'s default port (serve_app/ops/cli.py), kept so that a port-forward maps it to itself
# The admin pods' labels: the Service and the NetworkPolicy select by them; no Ray label (kuberay.POD_LABEL).
POD_LABELS = {"app.kubernetes.io/name": kuberay.NAME, "app.kubernetes.io/component": "admin"}
# In-cluster callers of the admin API carry this label (same namespace); operators use a port-forward instead.
ADMIN_CLIENT_LABEL = {"qubittron.io/admin-client": "true"}
# Where the admin pods may connect besides PostgreSQL (its port is the catalog ledger URL's): Redis, whose URL is a
# Secret the build never sees, so its standard port; and DNS (UDP and TCP).
REDIS_PORT, DNS_PORT = 6379, 53
POSTGRES_DEFAULT_PORT = 5432  # libpq's, where the ledger URL names none
RESOURCES = {"requests": {"cpu": "100m", "memory": "256Mi"}, "limits": {"cpu": "1", "memory": "512Mi"}}


def command(catalog: Catalog) -> list[str]:
    """`qbt admin serve` on every interface (the Service's and the port-forward's target), on the prod ledger with
    its password read from the mounted Secret file."""
    ledger = catalog.service_config("prod").ledger
    return ["qbt", "admin", "serve", "--host", "0.0.0.0", "--port", str(PORT),
            "--database", ledger.database, "--password-file", str(ledger.password_file)]


def _probe(**timing) -> dict:
    return {"httpGet": {"path": "/healthz", "port": "admin"}, "timeoutSeconds": 2, **timing}


def deployment(catalog: Catalog) -> dict:
    """One replica: the admin API keeps no state of its own (Redis and the ledger do). Raises ValueError where the
    prod ledger is not PostgreSQL, or its password could not be mounted as the head's is."""
    secret = kuberay.ledger_secret(catalog.service_config("prod"))
    if secret is None:
        raise ValueError("the prod profile's ledger is SQLite, on the head's disk: the admin Deployment reads the "
                         "ledger over the network, so set service.ledger.database to postgresql://... in "
                         "cluster/catalog.yaml")
    volume, mount = secret
    container = {
        "name": "admin", "image": kuberay.image(), "command": command(catalog),
        "ports": [{"containerPort": PORT, "name": "admin", "protocol": "TCP"}],
        "env": [{"name": "REDIS_URL", "valueFrom": {"secretKeyRef": dict(kuberay.REDIS_SECRET)}}],
        "volumeMounts": [mount],
        "readinessProbe": _probe(periodSeconds=5, failureThreshold=3),
        "livenessProbe": _probe(initialDelaySeconds=10, periodSeconds=20, failureThreshold=3),
        "resources": {k: dict(v) for k, v in RESOURCES.items()},
        "securityContext": dict(kuberay.security_context(), readOnlyRootFilesystem=True)}
    return {"apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": NAME, "labels": {"app.kubernetes.io/name": kuberay.NAME}},
            "spec": {"replicas": 1, "selector": {"matchLabels": dict(POD_LABELS)}, "template": {
                "metadata": {"labels": dict(POD_LABELS)},
                # It calls no Kubernetes API; fsGroup lets the image's user read the 0400 Secret file, as on the head.
                "spec": {"automountServiceAccountToken": False, "securityContext": {"fsGroup": kuberay.RAY_GID},
                         "containers": [container], "volumes": [volume]}}}}


def service() -> dict:
    """Cluster-internal only (ClusterIP): the target of `kubectl port-forward svc/<NAME>` and of admin clients."""
    return {"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": NAME, "labels": {"app.kubernetes.io/name": kuberay.NAME}},
            "spec": {"type": "ClusterIP", "selector": dict(POD_LABELS),
                     "ports": [{"name": "admin", "protocol": "TCP", "port": PORT, "targetPort": PORT}]}}


def _ports(port: int, *protocols: str) -> list[dict]:
    return [{"protocol": protocol, "port": port} for protocol in protocols]


def postgres_port(catalog: Catalog) -> int:
    return urlsplit(catalog.service_config("prod").ledger.database).port or POSTGRES_DEFAULT_PORT


def network_policy(catalog: Catalog) -> dict:
    """Ingress from admin clients of this namespace alone; egress to Redis, PostgreSQL and DNS alone."""
    return {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": {"name": NAME, "labels": {"app.kubernetes.io/name": kuberay.NAME}},
            "spec": {"podSelector": {"matchLabels": dict(POD_LABELS)}, "policyTypes": ["Ingress", "Egress"],
                     "ingress": [{"from": [{"podSelector": {"matchLabels": dict(ADMIN_CLIENT_LABEL)}}],
                                  "ports": _ports(PORT, "TCP")}],
                     "egress": [{"ports": _ports(REDIS_PORT, "TCP") + _ports(postgres_port(catalog), "TCP")},
                                {"ports": _ports(DNS_PORT, "UDP", "TCP")}]}}


def render(catalog: Catalog) -> str:
    objects = [deployment(catalog), service(), network_policy(catalog)]
    mount = objects[0]["spec"]["template"]["spec"]["containers"][0]["volumeMounts"][0]["mountPath"]
    header = ("# Generated by `qbt config build --profile prod`; do not edit (see serve_app/config/operator.py).\n"
              "# The admin API and console (`qbt admin serve`), never behind the public gateway. Operators reach it "
              f"with\n#   kubectl port-forward svc/{NAME} {PORT}:{PORT}\n"
              f"# and create the first admin token with\n#   kubectl exec deploy/{NAME} -- qbt admin tokens create "
              "--name NAME\n"
              f"# Needs Secrets {kuberay.REDIS_SECRET['name']} (key {kuberay.REDIS_SECRET['key']}) and "
              f"{kuberay.POSTGRES_SECRET['name']} (key {kuberay.POSTGRES_SECRET['key']}, mounted read-only in "
              f"{mount}), as the\n# head does. In-cluster clients need the pod label {_label(ADMIN_CLIENT_LABEL)}; "
              "egress is Redis, PostgreSQL and DNS\n# alone.\n")
    return header + yaml.safe_dump_all(objects, sort_keys=False, width=120)


def _label(labels: dict[str, str]) -> str:
    return ", ".join(f"{k}={v}" for k, v in labels.items())
