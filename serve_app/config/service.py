"""The typed configuration of the service and of every model it serves, validated at start-up.

A Serve config's `args` is a `ServiceConfig`; a wrong entry fails `serve run`/`serve deploy` with pydantic's message
naming the field, before any replica starts.
"""

from __future__ import annotations

from decimal import Decimal
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from deployments.sim_engine import SimConfig
from serve_app.config.paths import DEV_SCHEME, SIM_SCHEME, model_path
from serve_app.ledger.database import LedgerConfig
from serve_app.money import units
from serve_app.safety.policy import GuardMode

RESERVED_ENGINE_ARGS = {"model", "served_model_name", "max_model_len", "tokenizer"}


class Category(str, Enum):
    LLM = "llm"
    CODE = "code"
    VISION = "vision"
    SAFETY = "safety"


class Prices(BaseModel):
    model_config = ConfigDict(extra="forbid")
    input_usd_per_mtok: Annotated[Decimal, Field(ge=0)]
    output_usd_per_mtok: Annotated[Decimal, Field(ge=0)]

    @property
    def input_micros(self) -> int:
        return units.usd_to_micros(self.input_usd_per_mtok)

    @property
    def output_micros(self) -> int:
        return units.usd_to_micros(self.output_usd_per_mtok)

    @model_validator(mode="after")
    def _exact(self) -> Prices:
        self.input_micros, self.output_micros  # noqa: B018 - raises on more than 6 decimals
        return self


class Autoscaling(BaseModel):
    model_config = ConfigDict(extra="forbid")
    min_replicas: Annotated[int, Field(ge=0)] = 1
    max_replicas: Annotated[int, Field(ge=1)] = 1
    initial_replicas: Annotated[int, Field(ge=0)] | None = None
    target_ongoing_requests: Annotated[float, Field(gt=0)] = 16
    upscale_delay_s: Annotated[float, Field(ge=0)] = 30
    downscale_delay_s: Annotated[float, Field(ge=0)] = 600

    @model_validator(mode="after")
    def _ordered(self) -> Autoscaling:
        if self.max_replicas < self.min_replicas:
            raise ValueError("max_replicas must be >= min_replicas")
        return self


class Accelerator(BaseModel):
    """What one replica holds. `resource` names the Ray resource counted: `GPU` on real clusters, a custom resource
    (declared by `ray start --resources`) where one stands in for the accelerator, as in the local multi-node run."""

    model_config = ConfigDict(extra="forbid")
    type: Annotated[str, Field(min_length=1)]
    count: Annotated[int, Field(ge=1, le=16)] = 1
    resource: Annotated[str, Field(min_length=1, pattern=r"^[A-Za-z0-9_.:-]+$")] = "GPU"

    @property
    def is_gpu(self) -> bool:
        return self.resource == "GPU"


class Architecture(BaseModel):
    """What the sizing arithmetic needs: checkpoint size and the KV-cache shape."""

    model_config = ConfigDict(extra="forbid")
    weights_gib: Annotated[float, Field(gt=0)]
    layers: Annotated[int, Field(ge=1)]
    kv_heads: Annotated[int, Field(ge=1)]
    head_dim: Annotated[int, Field(ge=1)]
    kv_cache_bytes: Annotated[int, Field(ge=1, le=4)] = 2

    @property
    def kv_bytes_per_token(self) -> int:
        return 2 * self.layers * self.kv_heads * self.head_dim * self.kv_cache_bytes


DRAIN_MARGIN_S = 30
DEFAULT_QUEUED_REQUESTS = 128
STRUCTURED_OUTPUTS = {"backend": "xgrammar", "disable_any_whitespace": True}  # vLLM allows the flag per backend


class ModelSpec(BaseModel):
    """One served model: where its weights come from, how its engine runs, how it scales and what it costs."""

    model_config = ConfigDict(extra="forbid")

    id: Annotated[str, Field(min_length=1, pattern=r"^[A-Za-z0-9._-]+$")]
    category: Category
    source: str
    max_model_len: Annotated[int, Field(ge=16)]
    prices: Prices
    engine_args: dict[str, Any] = {}
    fim_template: str | None = None
    completions: bool = True
    num_cpus: Annotated[float, Field(gt=0)] = 1.0
    num_replicas: Annotated[int, Field(ge=1)] | None = None
    autoscaling: Autoscaling | None = None
    max_ongoing_requests: Annotated[int, Field(ge=1)] = 64
    # Requests waiting for a replica once every replica has max_ongoing_requests; more are answered 503 with
    # Retry-After at once (serving/routing.py) instead of queueing without end.
    max_queued_requests: Annotated[int, Field(ge=1)] | None = None  # default: 128; unbounded for safety models
    env: dict[str, str] = {}
    accelerator: Accelerator | None = None
    architecture: Architecture | None = None
    target_concurrency: Annotated[int, Field(ge=1)] | None = None
    simulation: SimConfig | None = None

    @field_validator("engine_args")
    @classmethod
    def _no_reserved(cls, v: dict[str, Any]) -> dict[str, Any]:
        clash = RESERVED_ENGINE_ARGS & set(v)
        if clash:
            raise ValueError(f"engine_args may not set {sorted(clash)}: use the model's own fields")
        return v

    @field_validator("fim_template")
    @classmethod
    def _fim(cls, v: str | None) -> str | None:
        if v is not None and ("{prefix}" not in v or "{suffix}" not in v):
            raise ValueError("fim_template must contain {prefix} and {suffix}")
        return v

    @model_validator(mode="after")
    def _scaling(self) -> ModelSpec:
        if self.num_replicas is not None and self.autoscaling is not None:
            raise ValueError("set either num_replicas or autoscaling, not both")
        tp = self.tensor_parallel_size
        if self.accelerator is not None and tp != self.accelerator.count:
            raise ValueError(f"tensor_parallel_size {tp} must equal the accelerator count {self.accelerator.count}")
        if self.simulated and self.simulation is None:
            self.simulation = SimConfig()
        if self.simulation is not None and not self.simulated:
            raise ValueError(f"simulation is only for {SIM_SCHEME} sources")
        return self

    @property
    def scales_from_zero(self) -> bool:
        return self.autoscaling is not None and self.autoscaling.min_replicas == 0

    @property
    def tensor_parallel_size(self) -> int:
        return int(self.engine_args.get("tensor_parallel_size", 1))

    @property
    def simulated(self) -> bool:
        """`sim://<name>`: the simulated engine (deployments/sim_engine.py) stands in for vLLM: fast tests of the
        path, fault tests and the gateway benchmark; never in the end-to-end tests."""
        return self.source.startswith(SIM_SCHEME)

    def weights_path(self) -> str:
        """A local directory for `dev://` sources, otherwise the path or Hugging Face id as given."""
        if self.source.startswith(DEV_SCHEME):
            return str(model_path(self.source[len(DEV_SCHEME):]))
        return self.source

    @property
    def queue_limit(self) -> int | None:
        """Requests that may wait for a replica (None: no bound). A safety model's callers are the guard, whose own
        timeout bounds the wait; a bound there would refuse guarded requests at once under a burst."""
        if self.max_queued_requests is not None:
            return self.max_queued_requests
        return None if self.category is Category.SAFETY else DEFAULT_QUEUED_REQUESTS

    def engine_kwargs(self) -> dict[str, Any]:
        """`engine_args` over the defaults. Structured output (chat's `response_format`) is compact JSON by
        default: with free whitespace a model may pad until max_tokens, each padding token billed (vLLM reads this
        per engine, not per request)."""
        return {"max_model_len": self.max_model_len, "structured_outputs_config": STRUCTURED_OUTPUTS,
                **self.engine_args}

    def deployment_name(self) -> str:
        return "model-" + self.id.replace(".", "_")


class IngressSpec(BaseModel):
    """`label_selector` pins the ingress to CPU nodes (the head), so that it never takes a GPU node's CPUs."""

    model_config = ConfigDict(extra="forbid")
    num_replicas: Annotated[int, Field(ge=1)] = 1
    num_cpus: Annotated[float, Field(gt=0)] = 0.5
    max_ongoing_requests: Annotated[int, Field(ge=1)] = 1000
    label_selector: dict[str, str] = {}


class GuardConfig(BaseModel):
    """The safety stage: which safety model judges, and the policy for keys that do not set their own."""

    model_config = ConfigDict(extra="forbid")
    model: str
    default_mode: GuardMode = GuardMode.BOTH
    block_controversial: bool = True
    fail_open: bool = False
    timeout_s: Annotated[float, Field(gt=0)] = 10
    stream_window_tokens: Annotated[int, Field(ge=1)] = 16


class ServiceConfig(BaseModel):
    """The `args` of the Serve application."""

    model_config = ConfigDict(extra="forbid")

    models: Annotated[list[ModelSpec], Field(min_length=1)]
    redis_url: str | None = None
    ingress: IngressSpec = IngressSpec()
    max_body_bytes: Annotated[int, Field(ge=1024)] = 2_000_000
    body_read_s: Annotated[float, Field(gt=0)] = 30  # a body that takes longer to arrive is refused
    max_sequences: Annotated[int, Field(ge=1)] = 256  # prompts x max(n, best_of) in one request
    # An address with this many invalid keys within the window gets 429s until the window ends (api/throttle.py).
    auth_failure_limit: Annotated[int, Field(ge=1)] = 20
    auth_failure_window_s: Annotated[float, Field(gt=0)] = 10
    tokenizer_rpm: Annotated[int, Field(ge=1)] = 600  # /tokenize and /detokenize calls per key per minute (free)
    default_rpm: Annotated[int, Field(ge=0)] = 0
    default_tpm: Annotated[int, Field(ge=0)] = 0
    default_concurrency: Annotated[int, Field(ge=0)] = 0  # requests in flight per key; 0: no cap (as rpm/tpm)
    reservation_ttl_s: Annotated[float, Field(gt=0)] = 900
    max_request_s: Annotated[float, Field(gt=0)] = 900
    # How a stream's tokens cross from the model replica to the ingress: `relay`, bytes on a connection shared by
    # the streams between an ingress and a replica (deployments/relay.py), or `handle`, one Serve handle message per
    # engine step.
    stream_transport: Literal["relay", "handle"] = "relay"
    # Serve's own access-log line per request on the ingress and each model replica. Off: the request log
    # (telemetry/metrics.py) already has one line per request, with its key, status and cost, and Serve's lines
    # cost the ingress about 4% of its CPU per request.
    serve_access_log: bool = False
    delivery_checkpoint_s: Annotated[float, Field(gt=0)] = 2.0  # what an ingress crash can leave unbilled, at most
    first_item_timeout_s: Annotated[float, Field(gt=0)] = 120
    replica_wait_s: Annotated[float, Field(gt=0)] = 30
    scale_from_zero_wait_s: Annotated[float, Field(gt=0)] = 60
    health_timeout_s: Annotated[float, Field(gt=0)] = 5
    guard: GuardConfig | None = None
    ledger: LedgerConfig = LedgerConfig()  # where the ledger is exported (SQLite locally, PostgreSQL in production)
    catalog_models: list[str] = []

    @property
    def drain_s(self) -> float:
        """How long a stopping model replica finishes what it runs: the longest request allowed, and a margin."""
        return self.max_request_s + DRAIN_MARGIN_S

    @model_validator(mode="after")
    def _unique(self) -> ServiceConfig:
        ids = [m.id for m in self.models]
        dupes = sorted({i for i in ids if ids.count(i) > 1})
        if dupes:
            raise ValueError(f"model ids must be unique; repeated: {dupes}")
        if self.guard is not None:
            spec = next((m for m in self.models if m.id == self.guard.model), None)
            if spec is None or spec.category is not Category.SAFETY:
                raise ValueError(f"guard.model {self.guard.model!r} must be one of the models, of category safety")
        return self


def load_yaml(path: str | Path) -> dict:
    import yaml

    return yaml.safe_load(Path(path).read_text())
