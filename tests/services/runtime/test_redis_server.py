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
