import pytest

from services.runtime.redis_server import RedisServer


@pytest.fixture(scope="session")
def redis_server():
    """A real redis-server on 127.0.0.1 (never a fake)."""
    server = RedisServer().start()
    yield server
    server.cleanup()


@pytest.fixture(scope="session")
def redis_cluster():
    """A real Redis Cluster: 3 masters + 3 replicas of redis-server on 127.0.0.1 (never a fake)."""
    from services.runtime.redis_cluster import LocalRedisCluster

    cluster = LocalRedisCluster().start()
    yield cluster
    cluster.stop()
