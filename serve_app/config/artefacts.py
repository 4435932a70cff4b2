"""The artefacts built from the catalog: a Serve config per profile and, for `prod`, the KubeRay RayService, its
NetworkPolicies, the gateway Service (the entry point), the admin API (its Deployment, Service and NetworkPolicy), and
Prometheus's PodMonitor and alert rules; with the Grafana dashboard, cluster/kustomization.yaml applies them all. One
source of truth; the checked-in artefacts are tested for drift (`qbt config build --check`)."""

from __future__ import annotations

from pathlib import Path

import yaml

from serve_app.config import kuberay, monitoring, operator
from serve_app.config.catalog import Catalog, load
from serve_app.config.paths import CLUSTER


def render_yaml(data: dict, header: str) -> str:
    return header + yaml.safe_dump(data, sort_keys=False, width=120)


def serve_config_path(name: str) -> Path:
    return CLUSTER / f"serve-{name}.yaml"


def build(name: str, catalog: Catalog | None = None) -> dict[Path, str]:
    """Every artefact of a profile, path -> text."""
    catalog = catalog or load()
    header = (f"# Generated from cluster/catalog.yaml by `qbt config build --profile {name}`; do not edit.\n"
              f"# {catalog.profiles[name].description}\n")
    out = {serve_config_path(name): render_yaml(catalog.serve_config(name), header)}
    if name == "prod":
        out[kuberay.MANIFEST] = kuberay.render(catalog, catalog.serve_config(name))
        out[kuberay.NETWORK_POLICY] = kuberay.render_network_policies()
        out[kuberay.GATEWAY_SERVICE] = kuberay.render_gateway_service()
        out[operator.MANIFEST] = operator.render(catalog)
        out[monitoring.POD_MONITOR] = monitoring.render_pod_monitor()
        out[monitoring.RULES] = monitoring.render_prometheus_rule()
    return out
