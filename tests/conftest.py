"""Shared fixtures, started once per session: a real Redis server, and the whole stack (`qbt serve`: Ray Serve,
the vLLM engine on the dev model) pointed at it."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
MODEL = "qbt-dev-llm"
STARTUP_TIMEOUT_S = 900


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class RedisServer:
    port: int
    data_dir: Path
    proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [shutil.which("redis-server"), "--port", str(self.port), "--bind", "127.0.0.1", "--dir",
             str(self.data_dir), "--appendonly", "yes", "--appendfsync", "always", "--save", ""],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        import redis

        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                if redis.Redis(port=self.port, socket_connect_timeout=0.5).ping():
                    return
            except redis.RedisError:
                time.sleep(0.1)
        raise RuntimeError("redis-server did not start")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=20)

    def restart(self) -> None:
        self.stop()
        self.start()


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
class Stack:
    base_url: str
    redis_url: str
    proc: subprocess.Popen
    log_path: Path
    metrics_url: str
    ray_tmp: Path

    def descendants(self) -> list[psutil.Process]:
        try:
            return psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []


def _drain(stream, log_path: Path, ready: threading.Event, lines: list[str]) -> None:
    with log_path.open("w") as log:
        for line in stream:
            log.write(line)
            log.flush()
            lines.append(line)
            if "[qbt] ready on" in line:
                ready.set()


@pytest.fixture(scope="session")
def stack(redis_server, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("run")
    port = free_port()
    metrics_port = free_port()
    ray_tmp = tmp_path_factory.mktemp("ray")
    env = dict(os.environ, REDIS_URL=redis_server.url, QBT_METRICS_PORT=str(metrics_port),
               QBT_RAY_TEMP_DIR=str(ray_tmp), OTEL_TRACES_EXPORTER="console", OTEL_BSP_SCHEDULE_DELAY="500")
    proc = subprocess.Popen(
        [str(BIN / "qbt"), "serve", "--port", str(port), "--run-dir", str(run_dir)], cwd=ROOT, env=env,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    log_path = run_dir / "serve.log"
    ready, lines = threading.Event(), []
    threading.Thread(target=_drain, args=(proc.stdout, log_path, ready, lines), daemon=True).start()
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while not ready.wait(1):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail("qbt serve did not become ready:\n" + "".join(lines[-40:]))
    stack = Stack(f"http://127.0.0.1:{port}", redis_server.url, proc, log_path,
                  f"http://127.0.0.1:{metrics_port}/metrics", ray_tmp)
    yield stack
    started = stack.descendants()
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail("qbt serve did not stop within 120 s of SIGINT")
    left = [p for p in started if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert not left, f"processes left running after stop: {[(p.pid, p.name()) for p in left]}"


@dataclass
class Customer:
    account: str
    key: str


@pytest.fixture
def make_customer(redis_server):
    """An account with the given credit and a key with optional limits. Keys skip the guard unless a test asks
    for it (`guard=None` takes the config's default), so that spine tests do not depend on the dev guard."""
    from serve_app import accounts, store

    r = store.sync_client(redis_server.url)

    def make(credits: str = "10", rpm: int | None = None, tpm: int | None = None, guard: str | None = "off"
             ) -> Customer:
        name = "t-" + uuid.uuid4().hex[:10]
        accounts.create_account(r, name, credits)
        key, _ = accounts.create_key(r, name, rpm=rpm, tpm=tpm, guard=guard)
        return Customer(name, key)

    return make


@pytest.fixture
def customer(make_customer) -> Customer:
    return make_customer()


@pytest.fixture
def client(stack, customer):
    import openai

    return openai.OpenAI(base_url=stack.base_url + "/v1", api_key=customer.key, max_retries=0, timeout=120)


@pytest.fixture
def http(stack, customer):
    import httpx

    with httpx.Client(base_url=stack.base_url, timeout=120,
                      headers={"Authorization": f"Bearer {customer.key}"}) as c:
        yield c


@pytest.fixture(scope="session")
def tokenizer():
    from transformers import AutoTokenizer

    from serve_app.dev_models import model_path

    return AutoTokenizer.from_pretrained(model_path(MODEL))
