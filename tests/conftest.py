"""The test tiers and what they share. Tiers run fast first, in this order whatever the file names: `unit` (no Ray,
no vLLM, no servers; the request path on fakes and the simulated engine), `redis` (the money scripts against a real
redis-server), `console` (the operator console in headless Chromium), `e2e` (`qbt serve`: Ray Serve, vLLM on the dev models, the official clients), `hostile` (hostile
clients against `qbt serve` on the simulated models), `cluster` (two Ray nodes), `faults` (faults injected under
load on the simulated models, then the money invariants). Within a tier,
tests marked `disruptive` (they kill parts of the shared stack) run last."""

from __future__ import annotations

import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support import RedisServer, free_port, stop_running_stacks

TIERS = ("unit", "redis", "console", "e2e", "hostile", "cluster", "faults")


def tier_of(item) -> str:
    part = Path(str(item.fspath)).relative_to(Path(__file__).parent).parts[0]
    return part if part in TIERS else "unit"


def pytest_collection_modifyitems(session, config, items):
    for item in items:
        item.add_marker(getattr(pytest.mark, tier_of(item)))
    items.sort(key=lambda i: (TIERS.index(tier_of(i)), i.get_closest_marker("disruptive") is not None))


def pytest_runtest_setup(item):
    if tier_of(item) in ("hostile", "cluster", "faults"):
        stop_running_stacks()


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory):
    if shutil.which("redis-server") is None:
        pytest.fail("redis-server is not installed: run `bash .ci/run`, or `apt-get install -y redis-server`")
    server = RedisServer(free_port(), tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def r(redis_server):
    import redis

    return redis.Redis.from_url(redis_server.url, decode_responses=True)


@dataclass
class Customer:
    account: str
    key: str


@pytest.fixture
def make_customer(redis_server):
    """An account with the given credit and a key with optional limits. Keys skip the guard unless a test asks
    for it (`guard=None` takes the config's default), so that spine tests do not depend on the dev guard."""
    from serve_app.money import accounts, keyring, keyspace

    r = keyspace.sync_client(redis_server.url)

    def make(credits: str = "10", rpm: int | None = None, tpm: int | None = None, guard: str | None = "off"
             ) -> Customer:
        name = "t-" + uuid.uuid4().hex[:10]
        accounts.create_account(r, name, credits)
        key, _ = keyring.create_key(r, name, rpm=rpm, tpm=tpm, guard=guard)
        return Customer(name, key)

    return make


@pytest.fixture
def customer(make_customer) -> Customer:
    return make_customer()
