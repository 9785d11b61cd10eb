"""`Gateway`: the grpc.aio server (kvstash.v1, health, reflection) plus the Prometheus endpoint.

It runs on a connected Ray (a local instance or `ray.address`), gets the worker actors through
`Router.start` from the factory it was given (`services.runtime.workers.WorkerSpawner` creates them; by
default they are found by name), and polls them for load and metrics in the background. It imports no
worker code (no torch, transformers or numba): what crosses to the workers is `services.wire`.
"""

from __future__ import annotations

import asyncio
import logging

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import CollectorRegistry, start_http_server

from services.api.kvstash.v1 import kvstash_pb2 as pb
from services.api.kvstash.v1 import kvstash_pb2_grpc as pb_grpc
from services.config import KvstashConfig
from services.gateway.auth import Authenticator
from services.gateway.http_api import HttpApi
from services.gateway.interceptors import ErrorInterceptor
from services.gateway.router import Router, Spawn
from services.gateway.servicer import KvStashServicer
from services.metrics import GatewayMetrics, WorkerMetricsCollector
from services.wire import StorageStats

log = logging.getLogger(__name__)
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["KvStash"].full_name
STORAGE_HEALTH = "kvstash.v1.Storage"  # health of the Redis tier (a name for grpc.health.v1 checks only)


class Gateway:
    def __init__(self, cfg: KvstashConfig, spawn: Spawn | None = None):
        self.cfg, self.spawn = cfg, spawn  # spawn: worker index -> actor handle (None: find them by name)
        self.registry = CollectorRegistry()
        self.metrics = GatewayMetrics(self.registry)
        self.collector = WorkerMetricsCollector()
        self.registry.register(self.collector)
        self.auth = Authenticator.from_file(cfg.gateway.api_keys_file, cfg.gateway.admin_tenants)
        self.router: Router | None = None
        self.server: grpc.aio.Server | None = None
        self.health = health.aio.HealthServicer()
        self.port = 0
        self.metrics_port = 0
        self._http = None
        self.http_api: HttpApi | None = None
        self.http_port = 0
        self._poller: asyncio.Task | None = None

    async def start(self) -> int:
        """Get the workers (waiting until their models are loaded), then serve. Returns the bound gRPC port."""
        self.router = await Router.start(self.cfg, self.collector, self.spawn)
        opts = [("grpc.max_receive_message_length", self.cfg.gateway.max_message_bytes),
                ("grpc.max_send_message_length", self.cfg.gateway.max_message_bytes)]
        self.server = grpc.aio.server(interceptors=[ErrorInterceptor(self.metrics)], options=opts)
        servicer = KvStashServicer(self.cfg, self.router, self.auth, self.metrics)
        pb_grpc.add_KvStashServicer_to_server(servicer, self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME), self.server)
        address = f"{self.cfg.gateway.host}:{self.cfg.gateway.port}"
        gw = self.cfg.gateway
        if gw.tls_cert_file:
            with open(gw.tls_key_file, "rb") as k, open(gw.tls_cert_file, "rb") as c:
                creds = grpc.ssl_server_credentials([(k.read(), c.read())])
            self.port = self.server.add_secure_port(address, creds)
        else:
            self.port = self.server.add_insecure_port(address)
        if self.port == 0:
            raise RuntimeError(f"could not bind {self.cfg.gateway.host}:{self.cfg.gateway.port}")
        await self.server.start()
        if self.cfg.gateway.metrics_port >= 0:
            self._http, _ = start_http_server(self.cfg.gateway.metrics_port, addr=self.cfg.gateway.host, registry=self.registry)
            self.metrics_port = self._http.server_port
        if self.cfg.http.enabled:
            self.http_api = HttpApi(self.cfg, servicer)
            self.http_port = await self.http_api.start()
        await self.poll_once()
        self._poller = asyncio.create_task(self._poll_loop())
        for name in ("", SERVICE_NAME):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        log.info("gateway on %s:%d, metrics on :%d, HTTP API on :%d", self.cfg.gateway.host, self.port,
                 self.metrics_port, self.http_port)
        return self.port

    async def poll_once(self) -> None:
        await self.router.poll()
        live = len(self.router.live())
        self.metrics.workers.set(live)
        self.metrics.prefix_routed.set(self.router.prefix_routed)
        if self._poller is not None:  # after start: the API's health follows whether any worker can serve
            status = health_pb2.HealthCheckResponse.SERVING if live else health_pb2.HealthCheckResponse.NOT_SERVING
            await self.health.set(SERVICE_NAME, status)  # "" (the process itself) stays SERVING: liveness
        await self._poll_storage()

    async def _poll_storage(self) -> None:
        live = self.router.live()
        if not live:
            return
        try:
            res = await live[0].actor.storage_stats.remote()
        except Exception:  # noqa: BLE001
            return
        up = isinstance(res, StorageStats)  # else an ErrorEvent: Redis does not answer
        status = health_pb2.HealthCheckResponse.SERVING if up else health_pb2.HealthCheckResponse.NOT_SERVING
        await self.health.set(STORAGE_HEALTH, status)  # generation goes on from the device meanwhile

        def gauge(name: str, doc: str, value: float, **labels) -> dict:
            return {"name": name, "doc": doc, "type": "gauge", "samples": [(name, labels, float(value))]}

        families = [gauge("kvstash_storage_up", "1 when Redis answers, else 0.", up)]
        if up:
            families += [gauge("kvstash_kv_bytes", "KV bytes held per tier.", res.bytes, tier="redis"),
                         gauge("kvstash_stored_sessions", "Sessions with a durable record in Redis.", res.sessions),
                         gauge("kvstash_stored_blocks", "KV blocks in Redis, each stored once however many "
                               "sessions share it.", res.blocks)]
        self.collector.update("", families)

    async def _poll_loop(self) -> None:
        while True:
            await asyncio.sleep(self.cfg.gateway.metrics_poll_interval_s)
            try:
                await self.poll_once()
            except Exception:
                log.exception("metrics poll failed")

    async def wait(self) -> None:
        await self.server.wait_for_termination()

    async def drain_workers(self, timeout_s: float = 60.0) -> None:
        """Ask every live worker to offload its idle sessions now (before a local Ray goes down with us)."""
        if self.router is None:
            return
        calls = [w.actor.drain.remote() for w in self.router.live()]
        try:
            await asyncio.wait_for(asyncio.gather(*calls, return_exceptions=True), timeout_s)
        except TimeoutError:
            log.warning("workers did not finish offloading within %.0f s", timeout_s)

    async def stop(self, grace: float = 2.0) -> None:
        if self._poller:
            self._poller.cancel()
        if self.http_api:
            await self.http_api.stop()
        if self.server:
            await self.server.stop(grace)
        if self._http:
            self._http.shutdown()
