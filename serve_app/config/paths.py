"""Where things are on disk: the checkout (for the catalog and its generated artefacts) and the dev models."""

from __future__ import annotations

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CLUSTER = ROOT / "cluster"
CATALOG = CLUSTER / "catalog.yaml"
DEV_SCHEME = "dev://"
SIM_SCHEME = "sim://"


def models_dir() -> Path:
    """Built dev models: `$QBT_MODELS_DIR`, else `.cache/models` in the checkout."""
    return Path(os.environ.get("QBT_MODELS_DIR", ROOT / ".cache" / "models"))


def model_path(model_id: str) -> Path:
    return models_dir() / model_id
