import pytest

from services.runtime.redis_server import RedisServer


@pytest.fixture(scope="session")
def redis_server():
    """A real redis-server on 127.0.0.1 (never a fake)."""
    server = RedisServer().start()
    yield server
    server.cleanup()
