"""The catalog (`cluster/catalog.yaml`): accelerators, the seed's models and the profiles, validated (every model
must fit its accelerators); a profile's Serve config is derived from it (`config/artefacts.py` writes them)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

from serve_app.config import sizing
from serve_app.config.paths import CATALOG
from serve_app.config.service import ModelSpec, ServiceConfig

SEED_MODELS = ("gpt-oss-120b", "gpt-oss-20b", "Llama-3.1-8B-Instruct", "Meta-Llama-3_3-70B-Instruct", "Qwen3-32B",
               "Mistral-7B-Instruct-v0.3", "Mistral-Small-3.2-24B-Instruct-2506", "Mistral-Nemo-Instruct-2407",
               "Qwen3-Coder-30B-A3B-Instruct", "Qwen2.5-VL-72B-Instruct", "Qwen3Guard-Gen-8B", "Qwen3Guard-Gen-0.6B")
APP_NAME = "qbt"
IMPORT_PATH = "serve_app.serving.app:build_app"


class AcceleratorType(BaseModel):
    model_config = ConfigDict(extra="forbid")
    memory_gib: Annotated[float, Field(gt=0)]
    gpus_per_node: Annotated[int, Field(ge=1)] = 1
    cpus_per_node: Annotated[int, Field(ge=1)] = 8
    memory_gib_per_node: Annotated[int, Field(ge=1)] = 32
    product: str = ""


class Http(BaseModel):
    model_config = ConfigDict(extra="forbid")
    host: str = "127.0.0.1"
    port: Annotated[int, Field(ge=1, le=65535)] = 8000


class Profile(BaseModel):
    """`proxy_location` HeadOnly: every profile runs Serve's direct ingress (the ingress replica serves HTTP), under
    which Serve keeps its proxy on the head anyway; EveryNode is for a proxy-mode deployment."""

    model_config = ConfigDict(extra="forbid")
    description: str = ""
    proxy_location: Literal["HeadOnly", "EveryNode"] = "HeadOnly"
    http: Http = Http()
    service: dict[str, Any] = {}
    models: list[ModelSpec] | Literal["all"]


class Catalog(BaseModel):
    model_config = ConfigDict(extra="forbid")
    accelerators: dict[str, AcceleratorType]
    models: list[ModelSpec]
    profiles: dict[str, Profile]

    @model_validator(mode="after")
    def _check(self) -> Catalog:
        ids = tuple(m.id for m in self.models)
        if sorted(ids) != sorted(SEED_MODELS):
            missing, extra = set(SEED_MODELS) - set(ids), set(ids) - set(SEED_MODELS)
            raise ValueError(f"the catalog must list exactly the seed's models; missing {sorted(missing)}, "
                             f"unexpected {sorted(extra)}")
        memory = self.memory_gib()
        for spec in self.models:
            f = sizing.fit(spec, memory)
            if not f.fits:
                raise ValueError(f"{spec.id} does not fit {f.accelerators}: needs {f.need_gib:.1f} GiB "
                                 f"(weights {f.weights_gib:.1f} + KV {f.kv_gib:.1f} + reserve {f.reserve_gib:.1f}), "
                                 f"budget {f.budget_gib:.1f} GiB; lower max_model_len or target_concurrency, or "
                                 f"add accelerators")
        for name in self.profiles:
            self.service_config(name)
        return self

    def memory_gib(self) -> dict[str, float]:
        return {k: v.memory_gib for k, v in self.accelerators.items()}

    def profile_models(self, name: str) -> list[ModelSpec]:
        models = self.profiles[name].models
        return self.models if models == "all" else models

    def service_config(self, name: str) -> ServiceConfig:
        if name not in self.profiles:
            raise ValueError(f"no profile {name!r}; profiles: {sorted(self.profiles)}")
        return ServiceConfig.model_validate({**self.profiles[name].service, "models": self.profile_models(name),
                                             "catalog_models": [m.id for m in self.models]})

    def serve_config(self, name: str) -> dict:
        """A Serve config that `serve run` and `serve deploy` accept."""
        profile = self.profiles[name]
        args = self.service_config(name).model_dump(mode="json", exclude_none=True, exclude_defaults=True)
        args["models"] = [m.model_dump(mode="json", exclude_none=True, exclude_defaults=True)
                          for m in self.profile_models(name)]
        return {"proxy_location": profile.proxy_location,
                "http_options": profile.http.model_dump(),
                "applications": [{"name": APP_NAME, "route_prefix": "/", "import_path": IMPORT_PATH, "args": args}]}


def load(path: Path = CATALOG) -> Catalog:
    return Catalog.model_validate(yaml.safe_load(path.read_text()))
