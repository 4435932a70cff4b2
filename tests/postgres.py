"""A real PostgreSQL server for the tests (imported, never collected), like `support.RedisServer`: its own cluster in
a fresh directory, its own port, password authentication, stopped by its pid. Run as root (the test machines),
initdb refuses to start, so the server runs as the `postgres` user in a directory under /tmp that it can reach
(pytest's own temporary directories are private to root)."""

from __future__ import annotations

import glob
import os
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from tests.support import free_port

INSTALL_HINT = "install postgresql: bash .ci/run or apt-get install -y postgresql"
USER = "qbt"


def binaries() -> Path:
    """The newest installed PostgreSQL's bin directory."""
    found = [Path(p).parent for p in glob.glob("/usr/lib/postgresql/*/bin/initdb")
             if Path(p).with_name("postgres").exists()]
    if not found:
        raise RuntimeError(INSTALL_HINT)
    return max(found, key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else -1)


@dataclass
class PostgresServer:
    root: Path
    bin_dir: Path
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen | None = None

    @classmethod
    def create(cls) -> PostgresServer:
        """A new cluster (initdb), not yet started."""
        bin_dir = binaries()
        root = Path(tempfile.mkdtemp(prefix="qbt-pg-", dir="/tmp"))
        root.chmod(0o755)
        server = cls(root, bin_dir)
        server.password_file.write_text(secrets.token_hex(16))
        server.password_file.chmod(0o600)
        server.socket_dir.mkdir()
        server.data_dir.mkdir(mode=0o700)
        for path in (server.password_file, server.socket_dir, server.data_dir):
            server._own(path)
        server._run([str(bin_dir / "initdb"), "-D", str(server.data_dir), "--auth=scram-sha-256",
                     f"--username={USER}", f"--pwfile={server.password_file}", "-E", "UTF8", "--locale=C",
                     "--no-sync"])
        return server

    @property
    def data_dir(self) -> Path:
        return self.root / "data"

    @property
    def socket_dir(self) -> Path:
        return self.root / "sock"

    @property
    def password_file(self) -> Path:
        return self.root / "password"

    @property
    def url(self) -> str:
        """The maintenance database's URL, without the password (it is in `password_file`)."""
        return self.database_url("postgres")

    def database_url(self, name: str) -> str:
        return f"postgresql://{USER}@127.0.0.1:{self.port}/{name}"

    def _as_postgres(self) -> dict:
        if os.geteuid() != 0:
            return {}
        return {"user": "postgres", "group": "postgres", "extra_groups": []}

    def _own(self, path: Path) -> None:
        if os.geteuid() == 0:
            shutil.chown(path, "postgres", "postgres")

    def _run(self, argv: list[str]) -> None:
        done = subprocess.run(argv, cwd=self.root, capture_output=True, text=True, **self._as_postgres())
        if done.returncode:
            raise RuntimeError(f"{Path(argv[0]).name} failed: {done.stderr.strip()[-2000:]}")

    def start(self) -> None:
        with open(self.root / "server.log", "ab") as log:
            self.proc = subprocess.Popen(
                [str(self.bin_dir / "postgres"), "-D", str(self.data_dir), "-p", str(self.port),
                 "-k", str(self.socket_dir), "-c", "listen_addresses=127.0.0.1", "-c", "fsync=on"],
                cwd=self.root, stdout=log, stderr=log, start_new_session=True, **self._as_postgres())
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError("postgres exited: " + self.log_tail())
            try:
                self.connect().close()
                return
            except Exception:
                time.sleep(0.1)
        raise RuntimeError("postgres did not accept connections: " + self.log_tail())

    def connect(self, database: str = "postgres"):
        import psycopg

        return psycopg.connect(self.database_url(database), password=self.password_file.read_text(),
                               connect_timeout=2, autocommit=True)

    def create_database(self, name: str) -> str:
        with self.connect() as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.database_url(name)

    def log_tail(self) -> str:
        path = self.root / "server.log"
        return path.read_text(errors="replace")[-2000:] if path.exists() else ""

    def stop(self) -> None:
        """A fast shutdown (SIGINT: open sessions are ended, unlike SIGTERM's wait for them), by the server's pid."""
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)

    def kill9(self) -> None:
        """kill -9 of the server and its backends (its own process group), as a machine crash would."""
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=20)
        self._wait_group_gone(self.proc.pid)

    def kill9_and_restart(self) -> None:
        """kill -9, then a start that recovers from the write-ahead log."""
        self.kill9()
        self.start()

    @staticmethod
    def _wait_group_gone(pgid: int, timeout: float = 10) -> None:
        """Until no live process is left in the group (a backend reparented and not yet reaped is a zombie: gone)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            alive = False
            for stat in glob.glob("/proc/[0-9]*/stat"):
                try:
                    state, _, group = Path(stat).read_text().rpartition(")")[2].split()[:3]
                except (OSError, ValueError):
                    continue
                alive = alive or (int(group) == pgid and state != "Z")
            if not alive:
                return
            time.sleep(0.05)

    def remove(self) -> None:
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)
