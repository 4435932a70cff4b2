"""More than one node, on one machine, deployed the way a cluster is: `ray start` a head (labelled as the gateway, so
the ingress lands there) and a worker holding the custom resource `qbt_dev_accel` in place of a GPU, token
authentication on, then `serve deploy cluster/serve-multinode.yaml` through the dashboard. Shows replica placement,
per-model autoscaling 1 -> 2 -> 1, scale from zero (503 with Retry-After, then served), and the loss and return of
the worker node (502 `upstream_error` meanwhile, never a hang).

The last tier: the e2e stack is stopped before it starts (tests/conftest.py), so two Ray instances never share the
machine."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import yaml

from serve_app.config import artefacts, catalog as catalogs
from serve_app.money import keyspace
from tests.support import BIN, ROOT, free_port

pytestmark = pytest.mark.cluster
MODEL, COLD = "qbt-dev-llm", "qbt-dev-llm-cold"
ACCEL = "qbt_dev_accel"
GATEWAY = "qubittron.io/role=gateway"
PROMPT = {"prompt": "The capital of Canada is", "max_tokens": 4, "temperature": 0}
LONG = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 300, "ignore_eos": True, "stream": True}


def session_pids(sid: int) -> list[int]:
    """Every process of one `ray start` (raylet, workers, vLLM engine cores): they share its session."""
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.getsid(int(entry)) == sid:
                    pids.append(int(entry))
            except OSError:
                continue
    return pids


@dataclass
class Node:
    """One `ray start --block`, in a session of its own so that the whole node can be stopped by its id."""

    args: list[str]
    env: dict
    log: Path
    proc: subprocess.Popen | None = None

    def start(self) -> None:
        with self.log.open("a") as out:
            self.proc = subprocess.Popen([str(BIN / "ray"), "start", "--block", *self.args], env=self.env,
                                         cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)

    def kill(self) -> None:
        """The node is lost: every process of it dies at once."""
        for pid in session_pids(self.proc.pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.wait(timeout=30)

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pass
        self.kill()
        deadline = time.monotonic() + 20
        while session_pids(self.proc.pid) and time.monotonic() < deadline:
            time.sleep(0.5)
        left = session_pids(self.proc.pid)
        assert not left, f"processes of the node left running: {left}"


@dataclass
class Cluster:
    base_url: str
    dashboard: str
    token: str
    head: Node
    worker: Node

    @property
    def auth(self) -> dict:
        return {"Authorization": f"Bearer {self.token}"}

    def applications(self) -> dict:
        res = httpx.get(self.dashboard + "/api/serve/applications/", timeout=30, headers=self.auth)
        res.raise_for_status()
        return res.json()

    def replicas(self, deployment: str) -> list[dict]:
        deployments = self.applications()["applications"].get(catalogs.APP_NAME, {}).get("deployments", {})
        return deployments.get(deployment, {}).get("replicas", [])

    def running(self, model: str) -> int:
        return sum(r["state"] == "RUNNING" for r in self.replicas("model-" + model))

    def wait_running(self, model: str, count: int, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        seen = []
        while time.monotonic() < deadline:
            seen.append(self.running(model))
            if seen[-1] == count:
                return
            time.sleep(1)
        pytest.fail(f"{model} did not reach {count} running replica(s) within {timeout_s:.0f}s; saw {seen[-20:]}")


def wait_served(base_url: str, key: str, model: str, timeout_s: float) -> list[int]:
    """Polls with a real request until one is served; returns the status codes answered meanwhile."""
    codes, deadline = [], time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        started = time.monotonic()
        res = httpx.post(base_url + "/v1/completions", json={"model": model, **PROMPT}, timeout=120,
                         headers={"Authorization": f"Bearer {key}"})
        codes.append(res.status_code)
        if res.status_code == 200:
            return codes
        assert time.monotonic() - started < 30, "a request waited more than 30 s for an answer"
        time.sleep(2)
    pytest.fail(f"{model} was not served within {timeout_s:.0f}s; answers: {codes[-20:]}")


@pytest.fixture(scope="module")
def cluster(redis_server):
    tmp = Path(tempfile.mkdtemp(prefix="qbt-mn-"))
    token = secrets.token_hex(32)
    (tmp / "token").write_text(token)
    env = dict(os.environ, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(tmp / "token"),
               REDIS_URL=redis_server.url, RAY_USAGE_STATS_ENABLED="0")
    gcs, dashboard, http_port = free_port(), free_port(), free_port()
    head = Node(["--head", "--port", str(gcs), "--num-cpus", "2", "--labels", GATEWAY, "--include-dashboard",
                 "true", "--dashboard-port", str(dashboard), "--ray-client-server-port", str(free_port()),
                 "--dashboard-agent-listen-port", str(free_port()), "--temp-dir", str(tmp / "ray")],
                env, tmp / "head.log")
    worker = Node(["--address", f"127.0.0.1:{gcs}", "--num-cpus", "2", "--resources", json.dumps({ACCEL: 3}),
                   "--dashboard-agent-listen-port", str(free_port())], env, tmp / "worker.log")
    config = yaml.safe_load(artefacts.serve_config_path("multinode").read_text())
    config["http_options"]["port"] = http_port
    (tmp / "serve.yaml").write_text(yaml.safe_dump(config))
    c = Cluster(f"http://127.0.0.1:{http_port}", f"http://127.0.0.1:{dashboard}", token, head, worker)
    try:
        head.start()
        _wait(lambda: httpx.get(c.dashboard + "/api/version", timeout=5, headers=c.auth).status_code == 200, 120,
              "the head", head.log)
        worker.start()
        subprocess.run([str(BIN / "serve"), "deploy", str(tmp / "serve.yaml"), "--address", c.dashboard],
                       env=env, cwd=ROOT, check=True, timeout=120)
        _wait(lambda: httpx.get(c.base_url + "/health", timeout=10).status_code == 200, 600, "the application",
              worker.log)
        yield c
    finally:
        worker.stop()
        head.stop()
        shutil.rmtree(tmp, ignore_errors=True)


def _wait(ready, timeout_s: float, what: str, log: Path) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if ready():
                return
        except httpx.HTTPError:
            pass
        time.sleep(2)
    tail = "".join(log.read_text(errors="replace").splitlines(keepends=True)[-30:]) if log.exists() else ""
    pytest.fail(f"{what} was not up within {timeout_s:.0f}s; {log.name}:\n{tail}")


def test_model_replicas_on_the_worker_ingress_on_the_head(cluster, customer):
    assert wait_served(cluster.base_url, customer.key, MODEL, 60) == [200]
    head_node = cluster.applications()["controller_info"]["node_id"]
    (ingress,) = cluster.replicas("Ingress")
    (model,) = cluster.replicas("model-" + MODEL)
    assert ingress["node_id"] == head_node
    assert model["node_id"] != head_node
    assert cluster.replicas("model-" + COLD) == []


def test_autoscaling_one_to_two_and_back(cluster, customer):
    """Eight long streams against a target of 2 ongoing requests per replica: Serve asks for a second replica,
    which lands on the worker's second accelerator; when the load stops it goes back to one."""
    stop, answers = threading.Event(), []

    def load():
        with httpx.Client(base_url=cluster.base_url, timeout=120,
                          headers={"Authorization": f"Bearer {customer.key}"}) as c:
            while not stop.is_set():
                answers.append(c.post("/v1/completions", json={**LONG, "stream": False}).status_code)

    workers = [threading.Thread(target=load) for _ in range(8)]
    for w in workers:
        w.start()
    try:
        cluster.wait_running(MODEL, 2, 300)
    finally:
        stop.set()
        for w in workers:
            w.join(120)
    assert answers and set(answers) == {200}
    assert len({r["node_id"] for r in cluster.replicas("model-" + MODEL)}) == 1
    cluster.wait_running(MODEL, 1, 180)


def test_scale_from_zero_answers_503_then_serves(cluster, customer):
    auth = {"Authorization": f"Bearer {customer.key}"}
    started = time.monotonic()
    res = httpx.post(cluster.base_url + "/v1/completions", json={"model": COLD, **PROMPT}, headers=auth, timeout=60)
    assert res.status_code == 503 and time.monotonic() - started < 20
    assert res.json()["error"]["code"] == "service_unavailable" and res.headers["Retry-After"] == "30"
    codes = wait_served(cluster.base_url, customer.key, COLD, 300)
    assert set(codes[:-1]) <= {503}
    assert httpx.get(cluster.base_url + "/health", timeout=10).json()["components"][COLD] == "on_demand"


def test_losing_the_worker_is_upstream_error_then_service_recovers(cluster, customer, r):
    auth = {"Authorization": f"Bearer {customer.key}"}
    with httpx.Client(base_url=cluster.base_url, timeout=120, headers=auth) as c:
        with c.stream("POST", "/v1/completions", json=LONG) as s:
            assert s.status_code == 200
            lines = s.iter_lines()
            next(lines)
            cluster.worker.kill()
            killed = time.monotonic()
            events = [line for line in lines if line]
        assert time.monotonic() - killed < 30, "the in-flight stream hung after the node died"
    assert events[-1] == "data: [DONE]"
    assert json.loads(events[-2][6:])["error"]["code"] == "upstream_error"

    for _ in range(2):
        started = time.monotonic()
        res = httpx.post(cluster.base_url + "/v1/completions", json={"model": MODEL, **PROMPT}, headers=auth,
                         timeout=60)
        assert res.status_code == 502 and res.json()["error"]["code"] == "upstream_error"
        assert res.headers["Retry-After"] and time.monotonic() - started < 20

    cluster.worker.start()
    codes = wait_served(cluster.base_url, customer.key, MODEL, 300)
    assert set(codes[:-1]) <= {502}
    account = r.hgetall(keyspace.account_record(customer.account))
    assert int(account["reserved"]) == 0
