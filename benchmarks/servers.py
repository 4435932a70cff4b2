"""What the benchmarks share: starting a system under test in its own session, waiting for it, pausing it while
another runs, benchmark keys on its Redis, and CPU seconds per process role (by process id, never by name match)."""

from __future__ import annotations

import os
import signal
import statistics
import subprocess
import time
from pathlib import Path

import httpx
import psutil

from serve_app.money import accounts, keyring, keyspace

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "benchmarks" / "results"
ROLES = ("ingress", "model replica", "guard replica", "proxy", "vllm api server", "engine", "redis", "ledger exporter",
         "ray", "other", "floor")


def say(msg: str) -> None:
    print(f"[bench] {msg}", flush=True)


def spread(xs: list[float | None], fmt: str = "{:.2f}") -> str:
    """The median of the rounds and their range, as every results table shows it."""
    xs = [x for x in xs if x is not None]
    if not xs:
        return "-"
    return f"{fmt.format(statistics.median(xs))} ({fmt.format(min(xs))} to {fmt.format(max(xs))})"


class System:
    """One server under test, started in its own session; its process tree can be paused while others run."""

    def __init__(self, name: str, port: int, health: str, cmd: list[str], run_dir: Path, env: dict | None = None):
        self.name, self.port, self.health, self.log = name, port, health, run_dir / f"{name}.log"
        run_dir.mkdir(parents=True, exist_ok=True)
        if env and "REDIS_URL" in env:  # the Redis its launcher starts has a password; this process reads it too
            env = {**env, "REDIS_PASSWORD_FILE": str(bench_redis_password())}
        say(f"starting {name}: {' '.join(cmd)}")
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, **(env or {})}, stdout=self.log.open("w"),
                                     stderr=subprocess.STDOUT, start_new_session=True)

    def tree(self) -> list[psutil.Process]:
        try:
            root = psutil.Process(self.proc.pid)
            return [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def _signal(self, signum: int) -> None:
        for p in self.tree():
            try:
                p.send_signal(signum)
            except psutil.Error:
                pass

    def pause(self) -> None:
        self._signal(signal.SIGSTOP)

    def resume(self) -> None:
        self._signal(signal.SIGCONT)
        self.wait_ready(timeout_s=120)

    def wait_ready(self, timeout_s: float = 900) -> None:
        started = time.monotonic()
        while time.monotonic() - started < timeout_s:
            if self.proc.poll() is not None:
                raise SystemExit(f"{self.name} exited with {self.proc.returncode}; its log: {self.log}")
            try:
                if httpx.get(f"http://127.0.0.1:{self.port}{self.health}", timeout=5).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(1)
        raise SystemExit(f"{self.name} not ready after {timeout_s:.0f} s; its log: {self.log}")

    def stop(self) -> None:
        """SIGCONT (a paused tree cannot stop), then SIGINT to its session, as Ctrl-C would."""
        self._signal(signal.SIGCONT)
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGINT)
        try:
            self.proc.wait(timeout=90)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)


def bench_redis_password() -> Path:
    """One password for every Redis the benchmarks' systems start, named by `REDIS_PASSWORD_FILE` here as there."""
    from serve_app.ops.local_redis import local_redis_password

    path = local_redis_password(ROOT / ".run" / "bench-redis")
    os.environ["REDIS_PASSWORD_FILE"] = str(path)
    return path


def bench_keys(redis_url: str) -> dict[str, str]:
    """Keys without limits on the benchmark's own Redis, guard off and with the guard's default policy (`both`)."""
    r = keyspace.sync_client(redis_url)
    accounts.ensure_account(r, "bench", "1000000")
    return {g: keyring.create_key(r, "bench", rpm=10**7, tpm=10**10, concurrency=10**5, guard=g)[0]
            for g in ("off", "both")}


def script_calls(redis_url: str) -> int:
    """Redis round trips of the money path: every admission and settlement is one script call."""
    stats = keyspace.sync_client(redis_url).info("commandstats")
    return sum(v["calls"] for k, v in stats.items() if k in ("cmdstat_evalsha", "cmdstat_eval"))


def role(p: psutil.Process) -> str:
    try:
        cmd = " ".join(p.cmdline()) or p.name()
    except psutil.Error:
        return "other"
    if "floor_server" in cmd:
        return "floor"
    if "EngineCore" in cmd or "VLLM::" in cmd:
        return "engine"
    if "vllm.entrypoints" in cmd:
        return "vllm api server"
    if "Ingress" in cmd:
        return "ingress"
    if "guard" in cmd and "ServeReplica" in cmd:
        return "guard replica"
    if "ServeReplica" in cmd and ("model-" in cmd or "LLMServer" in cmd):
        return "model replica"
    if "ProxyActor" in cmd or "haproxy" in cmd.lower():
        return "proxy"
    if "redis-server" in cmd:
        return "redis"
    if "LedgerExporter" in cmd:
        return "ledger exporter"
    if any(x in cmd for x in ("raylet", "gcs_server", "ServeController", "dashboard", "ray::", "ray/_private")):
        return "ray"
    return "other"


class CpuMeter:
    """CPU seconds per role over a window, from every process under the given systems."""

    def __init__(self, systems: list[System]):
        self.systems = systems

    def snapshot(self) -> dict[int, tuple[str, float]]:
        out = {}
        for system in self.systems:
            for p in system.tree():
                try:
                    t = p.cpu_times()
                    out[p.pid] = (role(p), t.user + t.system)
                except psutil.Error:
                    pass
        return out

    @staticmethod
    def delta(before: dict, after: dict) -> dict[str, float]:
        per = {r: 0.0 for r in ROLES}
        for pid, (r, t) in after.items():
            per[r] += t - (before[pid][1] if pid in before else 0.0)
        return per


class HostSteal:
    """The share of the machine's CPU time its virtual machine's host took (steal, from /proc/stat) since this was
    made: a noise figure every point reports (rounds with different steal are not equally loud)."""

    def __init__(self):
        self.start = self.ticks()

    @staticmethod
    def ticks() -> tuple[int, int]:
        """(steal, total) CPU ticks of the whole machine."""
        with open("/proc/stat") as f:
            ticks = [int(x) for x in f.readline().split()[1:9]]
        return ticks[7], sum(ticks)

    def pct(self) -> float:
        (steal0, total0), (steal1, total1) = self.start, self.ticks()
        return 100.0 * (steal1 - steal0) / (total1 - total0) if total1 > total0 else 0.0


def steal_spread(rows: list[dict]) -> str:
    """The rows' host steal, as the results tables show it."""
    return spread([r.get("steal_pct") for r in rows], "{:.1f}")
