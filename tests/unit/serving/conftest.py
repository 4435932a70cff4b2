"""The request path's unit tests run on `tests/inprocess.py`: the real gateway, simulated models in this process
and an in-memory billing that records what the path settles."""

from __future__ import annotations

import pytest

from tests.inprocess import FakeBilling, start_harness, stop_harness


@pytest.fixture
async def harness():
    h = await start_harness(FakeBilling())
    yield h
    stop_harness(h)
