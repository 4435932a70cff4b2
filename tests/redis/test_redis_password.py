"""The local profile's own Redis: bound to loopback, with a password that is in no URL, argv or environment value;
every client reads it from the file `REDIS_PASSWORD_FILE` names."""

from __future__ import annotations

import os
import shutil
import subprocess
import time

import pytest
import redis

from serve_app.money import keyspace
from serve_app.ops.local_redis import local_redis_password, own_redis_password, redis_command, redis_config
from tests.support import free_port


def test_the_own_redis_requires_its_password_and_clients_read_it_from_the_file(tmp_path, monkeypatch):
    data = tmp_path / "redis"
    password_file = local_redis_password(data)
    assert password_file.stat().st_mode & 0o777 == 0o600 and local_redis_password(data) == password_file
    port = free_port()
    command = redis_command(shutil.which("redis-server"), port, data, redis_config(data, password_file))
    assert not any(password_file.read_text().strip() in part for part in command)  # not in argv
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        url = f"redis://127.0.0.1:{port}/0"
        monkeypatch.delenv("REDIS_PASSWORD_FILE", raising=False)
        deadline = time.monotonic() + 20
        while True:
            try:
                keyspace.sync_client(url).ping()
                pytest.fail("the own Redis answered without its password")
            except redis.AuthenticationError:
                break
            except redis.ConnectionError:
                assert time.monotonic() < deadline, "redis-server did not start"
                time.sleep(0.1)
        monkeypatch.setenv("REDIS_PASSWORD_FILE", str(password_file))
        assert keyspace.sync_client(url).ping()
    finally:
        proc.terminate()
        proc.wait(timeout=20)


def test_only_the_launchers_own_redis_gets_a_password(tmp_path, monkeypatch):
    for name in ("REDIS_URL", "REDIS_PASSWORD_FILE"):
        monkeypatch.delenv(name, raising=False)
    assert own_redis_password("redis://elsewhere:6379/0", tmp_path) is None  # a Redis given by URL: as it is
    path = own_redis_password(None, tmp_path)
    assert path == tmp_path / "redis" / "password" and path.exists()
    assert os.environ["REDIS_PASSWORD_FILE"] == str(path)  # the file's name, for the replicas and the CLI


def test_a_redis_the_launcher_starts_for_a_given_url_gets_a_password_too(tmp_path, monkeypatch):
    from serve_app.ops.local_redis import started_redis_password

    monkeypatch.delenv("REDIS_PASSWORD_FILE", raising=False)
    path = started_redis_password("redis://127.0.0.1:6399/0", tmp_path)  # REDIS_URL set, nothing answered
    assert path == tmp_path / "redis" / "password" and path.stat().st_mode & 0o777 == 0o600
    assert os.environ["REDIS_PASSWORD_FILE"] == str(path)
    other = tmp_path / "given"
    monkeypatch.setenv("REDIS_PASSWORD_FILE", str(other))
    assert started_redis_password("redis://127.0.0.1:6399/0", tmp_path) == other
    with pytest.raises(SystemExit, match="carries a password") as info:
        started_redis_password("redis://:hunter2@127.0.0.1:6399/0", tmp_path)
    assert "hunter2" not in str(info.value)
