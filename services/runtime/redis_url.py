"""Redis client from a `redis.url`: one node, or a Redis Cluster.

Forms accepted:
- `redis://[:password@]host:port/db`, `rediss://...` (TLS): one node, `redis.Redis`.
- `redis+cluster://[user:password@]host:port[,host:port...]`, `rediss+cluster://...` (TLS): a Redis Cluster via
  redis-py's own `redis.cluster.RedisCluster`; the listed nodes are only startup nodes (the client discovers the
  slot map and follows MOVED/ASK itself). AUTH is the same for every node. A cluster has no db number: a path
  other than empty or `/0` is refused.

Invariant: a malformed URL raises `ValueError` naming the URL form, never a half-built client.
"""
from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import unquote

import redis
from redis.cluster import ClusterNode, RedisCluster

CLUSTER_SCHEMES = {"redis+cluster": False, "rediss+cluster": True}


@dataclass(frozen=True)
class ClusterUrl:
    """A parsed `redis+cluster://` URL."""

    nodes: tuple[tuple[str, int], ...]
    username: str | None
    password: str | None
    tls: bool

    @classmethod
    def parse(cls, url: str) -> ClusterUrl:
        scheme, sep, rest = url.partition("://")
        if not sep or scheme not in CLUSTER_SCHEMES:
            raise ValueError(f"not a cluster URL (redis+cluster:// or rediss+cluster://): {url!r}")
        auth, _, hostpart = rest.rpartition("@")
        hostpart, _, path = hostpart.partition("/")
        if path not in ("", "0"):
            raise ValueError(f"a Redis Cluster has only db 0: {url!r}")
        username = password = None
        if auth:
            user, colon, pw = auth.partition(":")
            username, password = (unquote(user) or None, unquote(pw)) if colon else (None, unquote(user))
        nodes = []
        for hp in hostpart.split(","):
            host, colon, port = hp.strip().rpartition(":")
            if not colon or not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise ValueError(f"cluster node must be host:port, got {hp!r} in {url!r}")
            nodes.append((host.strip("[]"), int(port)))
        return cls(tuple(nodes), username, password, CLUSTER_SCHEMES[scheme])


def is_cluster_url(url: str) -> bool:
    return url.partition("://")[0] in CLUSTER_SCHEMES


def redis_client(url: str, timeout_s: float | None = None) -> redis.Redis | RedisCluster:
    """The client for `url` (see module doc); bytes replies, `timeout_s` per command and per connect."""
    return _client(url, timeout_s, redis.Redis, RedisCluster, ClusterNode)


def async_redis_client(url: str, timeout_s: float | None = None):
    """`redis_client`'s asyncio twin (`redis.asyncio`), for an event loop (the gateway's)."""
    import redis.asyncio
    import redis.asyncio.cluster as acluster

    return _client(url, timeout_s, redis.asyncio.Redis, acluster.RedisCluster, acluster.ClusterNode)


def _client(url: str, timeout_s: float | None, single, cluster, node):
    kw = dict(socket_timeout=timeout_s, socket_connect_timeout=timeout_s, decode_responses=False)
    if not is_cluster_url(url):
        return single.from_url(url, **kw)
    cu = ClusterUrl.parse(url)
    return cluster(startup_nodes=[node(h, p) for h, p in cu.nodes], username=cu.username, password=cu.password,
                   ssl=cu.tls, **kw)


def redis_setting(reply: dict, name: str) -> str:
    """One value of a CONFIG GET reply: bytes keys from one node, str keys from RedisCluster; "" if absent."""
    value = reply.get(name.encode(), reply.get(name, b""))
    return value.decode() if isinstance(value, bytes) else str(value)
