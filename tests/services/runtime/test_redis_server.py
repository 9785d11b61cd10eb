from pathlib import Path

import pytest
import redis

from services.runtime.redis_server import RedisServer


def test_start_kill_restart_keeps_aof_data(tmp_path):
    server = RedisServer(data_dir=str(tmp_path), appendonly=True).start()
    try:
        c = redis.Redis.from_url(server.url)
        c.set("k", b"v")
        server.kill()
        with pytest.raises(redis.ConnectionError):
            redis.Redis.from_url(server.url, socket_connect_timeout=0.5).ping()
        server.start()
        # appendfsync everysec may lose the last second on SIGKILL; a clean restart must keep everything
        c = redis.Redis.from_url(server.url)
        c.set("k2", b"v2")
        server.restart()
        assert redis.Redis.from_url(server.url).get("k2") == b"v2"
    finally:
        server.cleanup()


def test_missing_binary_fails_loudly():
    with pytest.raises(RuntimeError, match="not found on PATH"):
        RedisServer(binary="no-such-redis-server").start()


# ---- lifecycle details ---------------------------------------------------------------------------------


def test_context_manager_binds_loopback_without_snapshots():
    with RedisServer() as server:
        assert server.url == f"redis://127.0.0.1:{server.port}/0"
        c = redis.Redis.from_url(server.url)
        assert c.ping() is True
        config = {k: v for name in ("bind", "save", "appendonly") for k, v in c.config_get(name).items()}
        assert config == {"bind": "127.0.0.1", "save": "", "appendonly": "no"}
        data_dir, pid = Path(server.data_dir), server.proc.pid
        assert data_dir.is_dir()
    assert server.proc is None and not data_dir.exists()  # a temp data dir is removed
    assert not Path(f"/proc/{pid}").exists()  # terminated and reaped


def test_stop_and_kill_are_idempotent(tmp_path):
    server = RedisServer(data_dir=str(tmp_path)).start()
    port = server.port
    server.stop()
    server.stop()
    server.kill()
    assert server.proc is None and tmp_path.is_dir()  # a caller's data dir is kept
    server.restart()  # from stopped: same port
    assert server.port == port and redis.Redis.from_url(server.url).ping()
    server.stop()


def test_password_is_required_and_kept_off_the_command_line(tmp_path):
    with RedisServer(data_dir=str(tmp_path), password='s3cret/p w"\\') as server:
        assert server.url == f"redis://:s3cret%2Fp%20w%22%5C@127.0.0.1:{server.port}/0"
        assert redis.Redis.from_url(server.url).ping() is True
        with pytest.raises(redis.AuthenticationError):
            redis.Redis(host="127.0.0.1", port=server.port).get("k")
        cmdline = Path(f"/proc/{server.proc.pid}/cmdline").read_bytes()
        assert b"s3cret" not in cmdline


def test_busy_port_fails_with_the_log_tail():
    with RedisServer() as first:
        second = RedisServer(port=first.port)
        with pytest.raises(RuntimeError, match=f"exited with code .* on port {first.port}(.|\n)*Address already in use"):
            second.start(timeout=5)
        assert second.proc is None and second.data_dir is None  # its temp dir is gone too
        assert redis.Redis.from_url(first.url).ping() is True  # the other server is untouched


def test_kill_is_a_crash(tmp_path):
    server = RedisServer(data_dir=str(tmp_path)).start()
    try:
        pid = server.proc.pid
        server.kill()
        assert server.proc is None and not Path(f"/proc/{pid}").exists()
        with pytest.raises(redis.ConnectionError):
            redis.Redis.from_url(server.url, socket_connect_timeout=0.5).ping()
    finally:
        server.cleanup()


def test_cluster_node_ports_leave_room_for_the_cluster_bus():
    """A cluster node's port is <= 55535 with port+10000 free (redis-server refuses higher ports;
    the kernel's ephemeral range reaches 60999, which once failed CI)."""
    import random
    import socket

    from services.runtime.redis_server import MAX_CLUSTER_PORT, free_cluster_port

    rng = random.Random(7)
    for _ in range(50):
        port = free_cluster_port(rng)
        assert 20000 <= port <= MAX_CLUSTER_PORT == 55535
        with socket.socket() as bus:
            bus.bind(("127.0.0.1", port + 10000))
