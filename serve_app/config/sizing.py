"""Sizing on paper: does a model's replica fit the accelerators it asks for?

Per replica: weights + KV cache for `max_model_len` tokens x `target_concurrency` sequences + a fixed activation
reserve per accelerator must fit `count x memory x gpu_memory_utilization`. vLLM allocates the KV cache from what
`gpu_memory_utilization` leaves after weights and activations, so this is the condition for the target concurrency
at full context to be schedulable.
"""

from __future__ import annotations

from dataclasses import dataclass

from serve_app.config.service import ModelSpec

GIB = 1024**3
ACTIVATION_RESERVE_GIB = 2.0


@dataclass(frozen=True)
class Fit:
    model: str
    accelerators: str
    budget_gib: float
    weights_gib: float
    kv_gib: float
    reserve_gib: float
    kv_bytes_per_token: int
    max_concurrency_at_full_context: int

    @property
    def need_gib(self) -> float:
        return self.weights_gib + self.kv_gib + self.reserve_gib

    @property
    def fits(self) -> bool:
        return self.need_gib <= self.budget_gib

    def row(self) -> str:
        return (f"| {self.model} | {self.accelerators} | {self.weights_gib:.1f} | {self.kv_bytes_per_token // 1024} | "
                f"{self.kv_gib:.1f} | {self.reserve_gib:.1f} | {self.need_gib:.1f} | {self.budget_gib:.1f} | "
                f"{self.max_concurrency_at_full_context} | {'yes' if self.fits else 'NO'} |")


HEADER = ("| model | accelerators | weights GiB | KV KiB/token | KV GiB (context x target) | reserve GiB | need GiB | "
          "budget GiB | sequences at full context | fits |\n|---|---|---|---|---|---|---|---|---|---|")


def fit(spec: ModelSpec, memory_gib: dict[str, float]) -> Fit:
    if spec.accelerator is None or spec.architecture is None or spec.target_concurrency is None:
        raise ValueError(f"{spec.id}: accelerator, architecture and target_concurrency are needed for sizing")
    acc = spec.accelerator
    if acc.type not in memory_gib:
        raise ValueError(f"{spec.id}: unknown accelerator type {acc.type!r}; known: {sorted(memory_gib)}")
    util = float(spec.engine_args.get("gpu_memory_utilization", 0.9))
    budget = acc.count * memory_gib[acc.type] * util
    per_token = spec.architecture.kv_bytes_per_token
    kv = per_token * spec.max_model_len * spec.target_concurrency / GIB
    reserve = ACTIVATION_RESERVE_GIB * acc.count
    room = budget - spec.architecture.weights_gib - reserve
    full = int(room * GIB // (per_token * spec.max_model_len)) if room > 0 else 0
    return Fit(spec.id, f"{acc.count} x {acc.type}", budget, spec.architecture.weights_gib, kv, reserve, per_token,
               full)


def table(specs: list[ModelSpec], memory_gib: dict[str, float]) -> str:
    return "\n".join([HEADER, *(fit(s, memory_gib).row() for s in specs)])
