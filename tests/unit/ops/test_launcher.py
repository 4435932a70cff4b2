"""The launcher's front door: in throughput-optimized mode clients get the ingress replica's own server."""

from __future__ import annotations

import socket

from serve_app.ops import launcher


def test_direct_ingress_takes_the_service_port_and_moves_the_proxy(monkeypatch):
    monkeypatch.setenv("RAY_SERVE_THROUGHPUT_OPTIMIZED", "1")
    monkeypatch.delenv("RAY_SERVE_ENABLE_DIRECT_INGRESS", raising=False)
    for bound in ("MIN", "MAX"):  # recorded, so that the values set below are undone after the test
        monkeypatch.setenv(f"RAY_SERVE_DIRECT_INGRESS_{bound}_HTTP_PORT", "0")
    proxy = launcher.direct_ingress("127.0.0.1", 18000, 2)
    assert proxy != 18000
    assert (launcher.os.environ["RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT"],
            launcher.os.environ["RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT"]) == ("18000", "18002")


def test_proxy_keeps_the_port_without_direct_ingress(monkeypatch):
    monkeypatch.setenv("RAY_SERVE_THROUGHPUT_OPTIMIZED", "0")
    monkeypatch.delenv("RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT", raising=False)
    assert launcher.direct_ingress("127.0.0.1", 18000, 1) == 18000
    assert "RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT" not in launcher.os.environ


def test_a_port_in_use_is_seen_before_anything_starts():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        assert not launcher.port_free("127.0.0.1", port)
    assert launcher.port_free("127.0.0.1", port)


def test_secrets_are_written_0600_from_the_start_into_a_new_file(tmp_path):
    from serve_app.ops.local_redis import write_secret

    path = tmp_path / "dev-key"
    path.write_text("old\n")
    path.chmod(0o644)
    with open(path) as held:  # someone who opened the old file
        write_secret(path, "new\n")
        assert held.read() == "old\n"
    assert path.read_text() == "new\n" and path.stat().st_mode & 0o777 == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["dev-key"]


def test_a_redis_url_is_shown_without_its_password():
    from serve_app.money.keyspace import shown

    assert shown("redis://:hunter2@redis.example:6380/0") == "redis://***@redis.example:6380/0"
    assert shown("rediss://user:hunter2@redis.example/1") == "rediss://***@redis.example/1"
    assert shown("redis://127.0.0.1:6399/0") == "redis://127.0.0.1:6399/0"
