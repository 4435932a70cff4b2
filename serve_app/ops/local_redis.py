"""The Redis the local profile runs: started by the launcher when nothing answers at the Redis URL, on loopback, with
a password from a 0600 file (in no argv, URL or environment value) and an append-only file fsynced on every write."""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import time
from pathlib import Path
from urllib.parse import urlparse

from serve_app.money import keyspace
from serve_app.ops.processes import die_with_parent, say


def own_redis_password(explicit_url: str | None, run_dir: Path) -> Path | None:
    """The local profile's own Redis (no REDIS_URL given) has a password; a Redis given by URL keeps whatever
    `REDIS_PASSWORD_FILE` says (nothing by default)."""
    if explicit_url or os.environ.get("REDIS_URL") or os.environ.get("REDIS_PASSWORD_FILE"):
        return None
    return _use_local_password(run_dir)


def started_redis_password(url: str, run_dir: Path) -> Path:
    """Every Redis the launcher starts has a password, also for a `REDIS_URL` that nothing answered (an unguarded
    Redis on loopback is open to every local user): `REDIS_PASSWORD_FILE`'s when set (`own_redis_password` sets it
    for the local profile's own), else the local profile's, which `REDIS_PASSWORD_FILE` then names."""
    if urlparse(url).password:
        raise SystemExit(f"nothing answers at {keyspace.shown(url)}, and its URL carries a password: start that "
                         "Redis, or unset REDIS_URL for the local profile's own")
    if os.environ.get("REDIS_PASSWORD_FILE"):
        return Path(os.environ["REDIS_PASSWORD_FILE"])
    path = _use_local_password(run_dir)
    say(f"the Redis started for {url} has the password in {path}: `qbt` in another shell needs "
        f"REDIS_PASSWORD_FILE={path}")
    return path


def _use_local_password(run_dir: Path) -> Path:
    """The local profile's password file, named by `REDIS_PASSWORD_FILE` for this process and its children."""
    path = local_redis_password(run_dir / "redis")
    os.environ["REDIS_PASSWORD_FILE"] = str(path)
    return path


def redis_answers(url: str) -> bool:
    try:
        return bool(keyspace.sync_client(url).ping())
    except Exception:
        return False


def redis_command(binary: str, port: int, data_dir: Path, config: Path | None = None) -> list[str]:
    """Money in Redis is acknowledged only once on disk: the append-only file is fsynced on every write, so a
    crash (even kill -9) loses no acknowledged settlement, top-up or revocation. Loopback only; a `config` file
    (the password) comes first, as redis-server wants it."""
    return [binary, *([str(config)] if config else []), "--port", str(port), "--bind", "127.0.0.1",
            "--dir", str(data_dir), "--appendonly", "yes", "--appendfsync", "always", "--save", "",
            "--daemonize", "no"]


def local_redis_password(data_dir: Path) -> Path:
    """The local Redis's password, made once and kept (mode 0600) beside its data; clients read it from the file."""
    data_dir.mkdir(parents=True, exist_ok=True)
    path = data_dir / "password"
    if not path.exists():
        write_secret(path, secrets.token_hex(32) + "\n")
    return path


def write_secret(path: Path, text: str) -> None:
    """A new file, mode 0600 from its creation, put in place of the old one: no moment where another local user
    could open it, and nobody holding the old file open reads the new secret."""
    staged = path.with_name(path.name + ".new")
    staged.unlink(missing_ok=True)
    fd = os.open(staged, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(staged, path)


def redis_config(data_dir: Path, password_file: Path) -> Path:
    """`requirepass` in a 0600 file, so the password is in no argv (`ps` shows the file's name only)."""
    path = data_dir / "redis.conf"
    write_secret(path, f"requirepass {password_file.read_text().strip()}\n")
    return path


def start_redis(url: str, data_dir: Path, password_file: Path | None = None) -> subprocess.Popen:
    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit("redis-server is not installed and REDIS_URL does not answer: install it "
                         "(apt-get install -y redis-server) or point REDIS_URL at a running Redis.")
    port = urlparse(url).port or 6379
    data_dir.mkdir(parents=True, exist_ok=True)
    say(f"starting redis-server on 127.0.0.1:{port} (data in {data_dir}, append-only file on)")
    config = redis_config(data_dir, password_file) if password_file else None
    command = redis_command(binary, port, data_dir, config) + ["--logfile", str(data_dir / "redis.log")]
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
                            preexec_fn=die_with_parent)
    for _ in range(100):
        if redis_answers(url):
            return proc
        if proc.poll() is not None:
            raise SystemExit(f"redis-server exited with {proc.returncode}; see {data_dir / 'redis.log'}")
        time.sleep(0.1)
    raise SystemExit(f"redis-server did not answer on {url}; see {data_dir / 'redis.log'}")
