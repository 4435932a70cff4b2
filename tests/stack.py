"""`qbt serve` as a subprocess, as a user runs it: started with a config, ready when it says so, stopped with
SIGINT and checked to leave no process behind."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import pytest

from tests.support import BIN, ROOT, free_port

STARTUP_TIMEOUT_S = 900


@dataclass
class Stack:
    base_url: str
    redis_url: str
    proc: subprocess.Popen
    log_path: Path
    metrics_url: str
    ray_tmp: Path
    run_dir: Path
    admin_url: str = ""
    stopped: list[str] = field(default_factory=list)

    def descendants(self) -> list[psutil.Process]:
        try:
            return psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []


    def stop(self) -> None:
        """SIGINT, as Ctrl-C would; nothing it started may be left running."""
        if self.stopped:
            return
        started = self.descendants()
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.stopped.append("killed")
            pytest.fail("qbt serve did not stop within 120 s of SIGINT")
        self.stopped.append("stopped")
        left = [p for p in started if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
        assert not left, f"processes left running after stop: {[(p.pid, p.name()) for p in left]}"


def _drain(stream, log_path: Path, ready: threading.Event, lines: list[str]) -> None:
    with log_path.open("w") as log:
        for line in stream:
            log.write(line)
            log.flush()
            lines.append(line)
            if "[qbt] ready on" in line:
                ready.set()


OTLP_SECRET = "otlp-canary-5f1e"  # what a tracing vendor's API key would be: the stack must not write it anywhere


def start_stack(redis_url: str, tmp_path_factory, config: Path | None = None) -> Stack:
    run_dir = tmp_path_factory.mktemp("run")
    port = free_port()
    metrics_port = free_port()
    ray_tmp = tmp_path_factory.mktemp("ray")
    env = dict(os.environ, REDIS_URL=redis_url, QBT_METRICS_PORT=str(metrics_port),
               QBT_RAY_TEMP_DIR=str(ray_tmp), OTEL_TRACES_EXPORTER="console", OTEL_BSP_SCHEDULE_DELAY="500",
               OTEL_EXPORTER_OTLP_HEADERS=f"authorization=Bearer {OTLP_SECRET}")  # unused by console: a canary
    admin_port = free_port()
    args = [str(BIN / "qbt"), "serve", "--port", str(port), "--run-dir", str(run_dir), "--admin-port",
            str(admin_port)]
    if config is not None:
        args += ["--config", str(config)]
    proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    log_path = run_dir / "serve.log"
    ready, lines = threading.Event(), []
    threading.Thread(target=_drain, args=(proc.stdout, log_path, ready, lines), daemon=True).start()
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while not ready.wait(1):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail("qbt serve did not become ready:\n" + "".join(lines[-40:]))
    return Stack(f"http://127.0.0.1:{port}", redis_url, proc, log_path, f"http://127.0.0.1:{metrics_port}/metrics",
                 ray_tmp, run_dir, f"http://127.0.0.1:{admin_port}")
