"""`LocalStack`: everything `kvstash up` runs, on one machine.

A redis-server it spawns itself (AOF on, under $KVSTASH_HOME/redis) unless `redis.url` is set; a local
Ray instance unless `ray.address` is set; the worker actors (created by a `WorkerSpawner` handed to the
gateway; on its own Ray instance, with `ray.num_cpus_per_worker` 0, each reserves an equal share of the
CPUs and runs that many torch threads); the gateway and its metrics endpoint.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path

import ray

from services.config import KvstashConfig, kvstash_home
from services.gateway.server import Gateway
from services.runtime.redis_server import RedisServer
from services.runtime.workers import WorkerSpawner

log = logging.getLogger(__name__)


def local_cpus_per_worker(cpus: float, workers: int) -> float:
    """CPUs each worker reserves on a Ray instance of `cpus` CPUs that only kvstash's workers use: an equal
    whole share, at least 1. (A worker on 2 cores that reserved 1 would run torch on one of them.)"""
    return float(max(1, int(cpus) // max(1, workers)))


class LocalStack:
    def __init__(self, cfg: KvstashConfig):
        self.cfg = copy.deepcopy(cfg)
        self.redis: RedisServer | None = None
        self.gateway: Gateway | None = None
        self._own_ray = False

    async def start(self) -> LocalStack:
        cfg = self.cfg
        if not cfg.redis.url:
            data_dir = Path(cfg.redis.data_dir or kvstash_home() / "redis")
            data_dir.mkdir(parents=True, exist_ok=True)
            self.redis = RedisServer(data_dir=str(data_dir), appendonly=True).start()
            cfg.redis.url = self.redis.url
            log.info("spawned redis-server at %s (data in %s)", cfg.redis.url, data_dir)
        if not ray.is_initialized():
            kwargs = {"include_dashboard": False, "namespace": cfg.ray.namespace, "log_to_driver": True}
            if cfg.ray.address:
                ray.init(address=cfg.ray.address, **kwargs)
            else:
                ray.init(num_cpus=cfg.ray.local_num_cpus or None, **kwargs)
            self._own_ray = True
        if not cfg.ray.num_cpus_per_worker and self._own_ray and not cfg.ray.address:
            cfg.ray.num_cpus_per_worker = local_cpus_per_worker(ray.cluster_resources().get("CPU", 1),
                                                                cfg.ray.num_workers)
            log.info("each of %d worker(s) reserves %g CPUs (and runs as many torch threads)",
                     cfg.ray.num_workers, cfg.ray.num_cpus_per_worker)
        self.gateway = Gateway(cfg, WorkerSpawner(cfg))
        await self.gateway.start()
        return self

    @property
    def address(self) -> str:
        return f"{self.cfg.gateway.host}:{self.gateway.port}"

    async def stop(self) -> None:
        if self.gateway:
            await self.gateway.stop()
            if self._own_ray:  # the workers die with this process: offload their sessions first (best effort)
                await self.gateway.drain_workers()
        if self._own_ray:
            ray.shutdown()
        if self.redis:
            self.redis.stop()
