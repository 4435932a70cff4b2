"""The start-up heap is frozen out of the collector's reach (deployments/heap.py)."""

from __future__ import annotations

import gc

from deployments.heap import freeze_startup_heap


def test_freezing_moves_the_live_heap_out_of_full_collections():
    gc.unfreeze()
    survivors = [[i] for i in range(10_000)]  # long-lived, as the tokenizers and Ray's state are
    try:
        frozen = freeze_startup_heap()
        assert frozen >= len(survivors) and gc.get_freeze_count() == frozen
        assert sum(gc.get_count()) < 100  # nothing left for the young generations to walk
    finally:
        gc.unfreeze()
