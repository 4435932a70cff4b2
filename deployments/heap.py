"""The start-up heap, frozen out of the garbage collector's reach once a replica is built, as vLLM's own API server
does after its start-up (`vllm.utils.gc_utils.freeze_gc_heap`).

Why: the ingress and the model replica hold a few hundred thousand long-lived objects (Ray, Serve, pydantic, the
tokenizers, vLLM). A full collection walks them all with the event loop stopped: 80-100 ms for the ingress's
imports alone on this machine's cores (160k objects), and serving's allocations trigger one now and then. Frozen,
a collection walks only what serving allocated since."""

from __future__ import annotations

import gc


def freeze_startup_heap() -> int:
    """Collects what start-up left behind, then freezes the rest; returns how many objects are now frozen."""
    gc.collect(0)
    gc.collect(1)
    gc.collect(2)
    gc.freeze()
    return gc.get_freeze_count()
