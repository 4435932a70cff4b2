"""What the KubeRay tests share: the generated RayService and the vendored CRD schema it must validate against."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from serve_app.config import kuberay

CRDS = Path(__file__).resolve().parents[2] / "data"


def crd_schema(name: str = "ray.io_rayservices.yaml") -> dict:
    crd = yaml.safe_load((CRDS / name).read_text())
    return next(v for v in crd["spec"]["versions"] if v["name"] == "v1")["schema"]["openAPIV3Schema"]


@pytest.fixture(scope="module")
def manifest() -> dict:
    return yaml.safe_load(kuberay.MANIFEST.read_text())


@pytest.fixture(scope="module")
def cluster(manifest) -> dict:
    return manifest["spec"]["rayClusterConfig"]


@pytest.fixture(scope="module")
def rayservice_schema() -> dict:
    return crd_schema()
