"""The end-to-end tier's stack, started once: `qbt serve` (Ray Serve, the vLLM engine on the dev models) pointed at
the session's real Redis, driven by the official clients."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest

from tests.support import BIN, MODEL, ROOT, RUNNING_STACKS, free_port

STARTUP_TIMEOUT_S = 900


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
    stopped: list[str] = []

    def stop() -> None:
        """SIGINT, as Ctrl-C would; nothing it started may be left running."""
        if stopped:
            return
        started = stack.descendants()
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            stopped.append("killed")
            pytest.fail("qbt serve did not stop within 120 s of SIGINT")
        stopped.append("stopped")
        left = [p for p in started if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
        assert not left, f"processes left running after stop: {[(p.pid, p.name()) for p in left]}"

    RUNNING_STACKS.append(stop)
    yield stack
    if stop in RUNNING_STACKS:
        RUNNING_STACKS.remove(stop)
    stop()


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

    from serve_app.config.paths import model_path

    return AutoTokenizer.from_pretrained(model_path(MODEL))
