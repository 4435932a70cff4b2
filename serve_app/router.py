"""Model id -> that model's Serve deployment handle, spec and tokenizer; unknown ids are `model_not_found`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from serve_app.catalog import ModelSpec
from serve_app.errors import ApiError, Code


@dataclass(slots=True)
class Route:
    spec: ModelSpec
    stream: Any
    complete: Any
    health: Any
    tokenizer: Any


class Router:
    def __init__(self, specs: list[ModelSpec], handles: dict[str, Any], catalog_models: list[str] = ()):
        self.catalog_models = set(catalog_models)
        self.routes: dict[str, Route] = {}
        for spec in specs:
            handle = handles[spec.id]
            self.routes[spec.id] = Route(
                spec=spec,
                stream=handle.options(stream=True, method_name="stream"),
                complete=handle.options(method_name="complete"),
                health=handle.options(method_name="check_health"),
                tokenizer=load_tokenizer(spec),
            )

    def route(self, model: str) -> Route:
        route = self.routes.get(model)
        if route is None and model in self.catalog_models:
            raise ApiError(Code.MODEL_NOT_FOUND, f"The model '{model}' is in the catalog but not deployed on this "
                           f"cluster; GET /v1/models lists the served models.", "model")
        if route is None:
            raise ApiError(Code.MODEL_NOT_FOUND, f"The model '{model}' does not exist or is not served here; "
                           f"GET /v1/models lists the served models.", "model")
        if not route.spec.completions:
            raise ApiError(Code.MODEL_NOT_FOUND, f"The model '{model}' does not support completions.", "model")
        return route


def load_tokenizer(spec: ModelSpec):
    """The ingress tokenizes once (for the context check and the reservation) and sends token ids on."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(spec.weights_path())
