"""A local Redis Cluster of real redis-servers on 127.0.0.1 (tests, benches): N masters, R replicas each.

`master_usage` measures how a key pattern spreads over the masters of any cluster.

Invariant: `start()` returns only once every one of the 16384 slots is served (cluster_state:ok), else raises
with redis-cli's output; `stop()` stops every node it started and removes their data dirs.
"""
from __future__ import annotations

import subprocess
import time
from dataclasses import dataclass

import redis
from redis.cluster import RedisCluster

from services.runtime.redis_server import RedisServer


class LocalRedisCluster:
    def __init__(self, masters: int = 3, replicas: int = 1, binary: str = "redis-server", cli: str = "redis-cli",
                 node_timeout_ms: int = 15000, appendonly: bool = False):
        self.masters, self.replicas, self.cli = masters, replicas, cli
        self.nodes = [RedisServer(binary=binary, cluster=True, cluster_node_timeout_ms=node_timeout_ms,
                                  appendonly=appendonly) for _ in range(masters * (1 + replicas))]

    @property
    def url(self) -> str:
        return "redis+cluster://" + ",".join(f"127.0.0.1:{n.port}" for n in self.nodes[: self.masters])

    def start(self, timeout: float = 30.0) -> LocalRedisCluster:
        try:
            for n in self.nodes:
                n.start()
            out = subprocess.run([self.cli, "--cluster", "create", *(f"127.0.0.1:{n.port}" for n in self.nodes),
                                  "--cluster-replicas", str(self.replicas), "--cluster-yes"],
                                 capture_output=True, text=True, timeout=timeout)
            if out.returncode != 0:
                raise RuntimeError(f"redis-cli --cluster create failed: {out.stdout[-2000:]}{out.stderr[-2000:]}")
            self._wait_ok(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ok(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if all(b"cluster_state:ok" in n.client().execute_command("CLUSTER", "INFO") for n in self.nodes):
                return
            time.sleep(0.1)
        raise RuntimeError("Redis Cluster did not reach cluster_state:ok")

    def master_clients(self) -> list[redis.Redis]:
        """A plain client per current master (for per-shard inspection)."""
        return [n.client() for n in self.nodes if n.running and n.client().info("replication")["role"] == "master"]

    def stop(self) -> None:
        for n in self.nodes:
            n.stop()


@dataclass(frozen=True)
class MasterUsage:
    """What one master holds of a key pattern: its address, key count and bytes (MEMORY USAGE, summed)."""

    node: str
    keys: int
    bytes: int


def master_usage(client: RedisCluster, pattern: str) -> list[MasterUsage]:
    """Keys and bytes of `pattern` on every master of the cluster `client` talks to, in node-name order."""
    out = []
    for node in sorted(client.get_primaries(), key=lambda n: n.name):
        conn = node.redis_connection
        keys = list(conn.scan_iter(match=pattern, count=1000))
        pipe = conn.pipeline(transaction=False)
        for k in keys:
            pipe.memory_usage(k, samples=0)
        out.append(MasterUsage(node.name, len(keys), sum(int(b or 0) for b in pipe.execute()) if keys else 0))
    return out
