"""`LocalStack`: everything `kvstash up` runs, on one machine.

A redis-server it spawns itself (AOF on, under $KVSTASH_HOME/redis) unless `redis.url` is set; a local
Ray instance unless `ray.address` is set; the worker actors (created by a `WorkerSpawner` handed to the
gateway); the gateway and its metrics endpoint.
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
