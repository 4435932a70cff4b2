"""`qbt serve`: the whole local stack in one process tree, and nothing left behind when it stops.

Builds missing dev models, starts Redis if `REDIS_URL` does not answer (loopback, its own password in
`.run/redis/password`, append-only file fsynced on every write), starts Ray, deploys
the Serve config and waits for `/health`. The launcher makes itself a child subreaper, so that processes orphaned
under it (vLLM engine cores of killed replicas) are re-parented to it and stopped by process id on exit.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import psutil

from serve_app.config.paths import models_dir
from serve_app.config.service import ServiceConfig, load_yaml
from serve_app.money import accounts, keyring, keys, keyspace
from serve_app.money.admission import key_is_active
from serve_app.ops.local_redis import (own_redis_password, redis_answers, start_redis, started_redis_password,
                                       write_secret)
from serve_app.ops.processes import become_subreaper, die_with_parent, say

STOP_BUDGET_S = 30  # a stop, however many signals arrive, finishes within this
SERVE_DRAIN_S = 10
DEV_ACCOUNT, DEV_CREDITS = "dev", "100"


def dev_key(url: str, run_dir: Path) -> str:
    """The local profile's dev account and key; the key is kept in `.run/dev-key` so restarts reuse it."""
    r = keyspace.sync_client(url)
    accounts.ensure_account(r, DEV_ACCOUNT, DEV_CREDITS)
    path = run_dir / "dev-key"
    if path.exists():
        key = path.read_text().strip()
        if key_is_active(r, keys.key_hash(key)):
            return key
    key, _ = keyring.create_key(r, DEV_ACCOUNT)
    write_secret(path, key + "\n")
    return key


def deploy_failure() -> str | None:
    """Serve's own verdict, so that a deployment that cannot start fails the launch instead of timing out."""
    from ray import serve

    for name, app in serve.status().applications.items():
        if app.status == "DEPLOY_FAILED":
            return f"application {name}: {app.message[-1500:]}"
    return None


def wait_healthy(port: int, timeout_s: float, proc_check) -> None:
    started = time.monotonic()
    last = ""
    while time.monotonic() - started < timeout_s:
        proc_check()
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=10) as resp:
                if resp.status == 200:
                    return
        except Exception as exc:
            body = getattr(exc, "read", lambda: b"")()
            last = body.decode(errors="replace") or type(exc).__name__
        say(f"starting up ({time.monotonic() - started:.0f}s): {last[:160] or 'waiting for the proxy'}")
        time.sleep(5)
    raise SystemExit(f"the service was not healthy after {timeout_s:.0f}s (last: {last[:300]}); "
                     "see the Ray logs under /tmp/ray/session_latest/logs")


def _fail_if_deploy_failed() -> None:
    failure = deploy_failure()
    if failure:
        raise SystemExit(f"the deployment failed; fix the cause and run again:\n{failure}")


def _quietly(fn) -> None:
    try:
        fn()
    except Exception as exc:
        say(f"{getattr(fn, '__name__', fn)}: {exc}")


def stop_descendants(grace_s: float = 10) -> None:
    me = psutil.Process()
    procs = me.children(recursive=True)
    for p in procs:
        try:
            p.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(procs, timeout=grace_s)
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=3)


def serve_forever(config_path: Path, port: int | None, redis_url: str | None, run_dir: Path,
                  num_cpus: int, startup_timeout_s: float, admin_port: int = 8101) -> int:
    # Ray Serve's throughput-optimized mode: the ingress replica serves HTTP itself (no proxy hop) and handles
    # talk gRPC (README, Performance). Set before Ray is imported anywhere in this process.
    os.environ.setdefault("RAY_SERVE_THROUGHPUT_OPTIMIZED", "1")
    # A one-machine Ray: its node address is loopback, so every Ray listener (GCS, raylet, workers, the metrics
    # export) binds 127.0.0.1 instead of every interface. Ray's own switch for machines that are not cluster
    # nodes; read when Ray is imported. `ray start` clusters (the multinode profile, KubeRay) do not use it.
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    become_subreaper()
    run_dir.mkdir(parents=True, exist_ok=True)
    stopping = {"flag": False}

    def on_signal(signum, frame):
        if stopping["flag"]:  # a second Ctrl-C or a supervisor's SIGTERM: the cleanup under way goes on
            say(f"{signal.Signals(signum).name} while stopping: the cleanup continues (at most {STOP_BUDGET_S}s)")
            return
        stopping["flag"] = True
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    redis_proc = None
    try:
        from serve_app.ops.dev_models import ensure_built

        for model_id, path in ensure_built(log=say).items():
            say(f"dev model {model_id} at {path}")
        serve_config = load_yaml(config_path)
        url = keyspace.redis_url(redis_url)
        own_redis_password(redis_url, run_dir)  # names the local profile's password file when no Redis is given
        if not redis_answers(url):
            redis_proc = start_redis(url, run_dir / "redis", started_redis_password(url, run_dir))
        key = dev_key(url, run_dir)
        http = serve_config.get("http_options", {})
        port = port or int(http.get("port", 8000))
        deploy(serve_config, url, http.get("host", "127.0.0.1"), port, num_cpus, run_dir)
        # ray.init installs Ray's own SIGTERM handler, which ends the process on the spot, skipping the cleanup.
        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
        wait_healthy(port, startup_timeout_s, _fail_if_deploy_failed)
        admin = admin_port and start_admin(url, run_dir, admin_port, local_ledger(_app_args(serve_config), run_dir))
        # The key stays out of the log (a supervisor's log outlives the terminal): its file and its id are shown.
        key_file = run_dir / "dev-key"
        say(f"ready on http://127.0.0.1:{port}  dev key in {key_file} ({keys.key_id(keys.key_hash(key))})"
            + (f"  admin API and console on http://127.0.0.1:{admin_port}/" if admin else ""))
        say(f"try: curl http://127.0.0.1:{port}/v1/completions -H \"Authorization: Bearer $(cat {key_file})\" "
            "-H 'Content-Type: application/json' "
            "-d '{\"model\": \"qbt-dev-llm\", \"prompt\": \"The capital of Canada is\", \"max_tokens\": 16, "
            "\"temperature\": 0}'")
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        say("stopping")
        return 0
    finally:
        shutdown(redis_proc)


def start_admin(url: str, run_dir: Path, port: int, ledger: dict) -> subprocess.Popen | None:
    """The admin API and console (`qbt admin serve`) on loopback, with a local admin token kept in
    `.run/admin-token`; a child process, stopped with the rest of the tree."""
    from serve_app.admin import tokens

    if not port_free("127.0.0.1", port):
        say(f"warning: port {port} is taken; the admin API and console are not started (--admin-port)")
        return None
    r = keyspace.sync_client(url)
    path = run_dir / "admin-token"
    if not (path.exists() and tokens.actor(r, "Bearer " + path.read_text().strip())):
        write_secret(path, tokens.create(r, "local-operator") + "\n")
    command = [sys.executable, "-m", "serve_app.ops.cli", "admin", "serve", "--port", str(port),
               "--database", ledger["database"]]
    if ledger.get("password_file"):
        command += ["--password-file", str(ledger["password_file"])]
    # Redis's URL in the environment, not on the command line, where `ps` would show a password in it.
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, preexec_fn=die_with_parent,
                            env={**os.environ, "REDIS_URL": url})
    for _ in range(100):
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1).close()
            break
        except OSError:
            if proc.poll() is not None:
                say(f"warning: the admin API exited with {proc.returncode}; run `qbt admin serve` to see why")
                return None
            time.sleep(0.2)
    say(f"admin API and console on http://127.0.0.1:{port}/  admin token in {path} "
        f"(sign in with it; more: qbt admin tokens create --name NAME)")
    return proc


def _app_args(serve_config: dict) -> dict:
    apps = serve_config.get("applications") or [{}]
    return apps[0].get("args") or {}


def port_free(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def direct_ingress(host: str, port: int, ingress_replicas: int) -> int:
    """The port for Serve's proxy. In throughput-optimized mode Serve starts an HTTP server in the ingress replica
    itself (direct ingress); clients are given that one, with no proxy hop (README, Performance), and the proxy
    moves to a free port. Otherwise the proxy keeps the service port."""
    if os.environ.get("RAY_SERVE_THROUGHPUT_OPTIMIZED") != "1" or \
            os.environ.get("RAY_SERVE_ENABLE_DIRECT_INGRESS", "1") != "1":
        return port
    os.environ["RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT"] = str(port)
    os.environ["RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT"] = str(port + ingress_replicas)
    # Serve holds a dead replica's port out of use for 150 s (for HAProxy, which this does not run); with one port
    # per ingress replica, a crashed ingress could not come back on the service's port until then.
    os.environ.setdefault("RAY_SERVE_PORT_QUARANTINE_S", "0")
    # Serve keeps a stopping ingress taking requests for 30 s (for load balancers to notice; there is none here),
    # which would leave its drain of settlements (serving/ingress.py) no time before the force-kill.
    os.environ.setdefault("RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S", "2")
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def local_ledger(args: dict, run_dir: Path) -> dict:
    """A config that does not say where the ledger goes keeps it beside this run's Redis data, in the run directory
    (`qbt usage --run-dir` reads it there)."""
    ledger = dict(args.get("ledger") or {})
    ledger.setdefault("database", ledger_database(run_dir))
    return ledger


def ledger_database(run_dir: Path) -> str:
    return "sqlite:///" + str(run_dir.resolve() / "ledger.sqlite3")


def deploy(serve_config: dict, url: str, host: str, port: int, num_cpus: int, run_dir: Path) -> None:
    import ray
    from ray import serve

    from serve_app.serving.app import build_app

    if not port_free(host, port):
        raise SystemExit(f"port {port} on {host} is in use: stop what uses it (another `qbt serve`?) or pass "
                         "--port")
    apps = [(app, {**app.get("args", {}), "redis_url": url, "ledger": local_ledger(app.get("args", {}), run_dir)})
            for app in serve_config["applications"]]
    configs = [ServiceConfig.model_validate(args) for _, args in apps]
    proxy_port = direct_ingress(host, port, max(c.ingress.num_replicas for c in configs))
    if proxy_port != port:
        say(f"clients talk to the ingress replica on {host}:{port} (direct ingress); Serve's proxy is on "
            f"{host}:{proxy_port}")
    say(f"starting Ray ({num_cpus} logical CPUs) and deploying {len(serve_config['applications'])} app(s)")
    # Ray's processes inherit this process's environment: REDIS_URL, REDIS_PASSWORD_FILE (the file's name, not the
    # password) and OTEL_* reach the replicas so. A runtime_env's env_vars would also do it, but Ray's runtime-env
    # agent writes them to its log (readable by every local user), OTLP headers with their API keys included.
    os.environ.update({"REDIS_URL": url, "QBT_MODELS_DIR": str(models_dir())})
    ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False,
             _metrics_export_port=int(os.environ.get("QBT_METRICS_PORT", "8080")),
             _temp_dir=os.environ.get("QBT_RAY_TEMP_DIR"))
    serve.start(http_options={"host": host, "port": proxy_port}, proxy_location="HeadOnly")
    for app, args in apps:
        # Not waiting here: wait_healthy() polls /health and reports progress meanwhile.
        serve._run(build_app(args), name=app["name"], route_prefix=app.get("route_prefix", "/"), _blocking=False)

def shutdown(redis_proc: subprocess.Popen | None) -> None:
    """Within STOP_BUDGET_S: Serve is given a few seconds to drain, then Ray stops, then Redis (its AOF is written
    on every write), then whatever is left of the process tree is terminated and killed, by process id."""
    import ray

    started = time.monotonic()
    if ray.is_initialized():
        from ray import serve

        drain = threading.Thread(target=_quietly, args=(serve.shutdown,), daemon=True)
        drain.start()
        drain.join(SERVE_DRAIN_S)
        if drain.is_alive():
            # Not ray.shutdown(): the drain thread still inside Ray would then make Ray's core worker end this
            # process on the spot, before the rest of the cleanup. Ray's processes are stopped by id below.
            say(f"Serve did not stop within {SERVE_DRAIN_S}s; stopping its processes")
        else:
            _quietly(ray.shutdown)
    if redis_proc is not None and redis_proc.poll() is None:
        redis_proc.terminate()
        try:
            redis_proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            redis_proc.kill()
    stop_descendants(grace_s=max(1.0, STOP_BUDGET_S - 8 - (time.monotonic() - started)))
    say("stopped; no process left running")
    sys.stdout.flush()
