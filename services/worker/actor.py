"""`WorkerActor`: the Ray actor around an `Engine`.

Only the messages of `services.wire` and plain data cross Ray (never torch tensors, never exception
objects: errors travel as `ErrorEvent`). `generate` is a streaming generator
(`.options(num_returns="streaming")`) of `TokensEvent`s ending with one `DoneEvent` or `ErrorEvent`; when
its consumer goes away the generator is closed and the engine task is cancelled, freeing the session.
Unary methods answer their value or an `ErrorEvent`.

This module imports the engine (torch, transformers, numba) only inside the actor's process, in
`__init__`: whoever creates the actors (services/runtime/workers.py, in the gateway's process) needs
neither, so the gateway's image needs no torch. The actors are named `services.wire.actor_name(i)`.
"""

from __future__ import annotations

import asyncio
import logging
import os

import ray

from services.config import KvstashConfig, kvstash_home
from services.errors import KvstashError
from services.wire import (
    ErrorEvent,
    GenerateCall,
    PrefixSharedEvent,
    SessionInfo,
    SessionPage,
    StorageStats,
    StoredSession,
    WorkerLoad,
    WorkerReady,
    is_terminal,
)

log = logging.getLogger(__name__)


@ray.remote
class WorkerActor:
    def __init__(self, worker_id: str, cfg: dict):
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        from services.worker.engine import Engine  # here, in the worker's process only (torch, transformers)

        self.worker_id = worker_id
        self.engine = Engine(KvstashConfig.from_dict(cfg), worker_id)
        run = kvstash_home() / "run"  # which process is which worker (operators, fault tests)
        run.mkdir(parents=True, exist_ok=True)
        (run / f"worker-{worker_id}.pid").write_text(str(os.getpid()))

    async def ready(self) -> WorkerReady:
        return WorkerReady(self.worker_id, self.engine.runner.fingerprint, str(self.engine.runner.device))

    async def generate(self, call: GenerateCall):
        """Stream engine events for one call: `TokensEvent`* then a `DoneEvent` or an `ErrorEvent`."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        try:
            task_id = self.engine.submit(call, lambda ev: loop.call_soon_threadsafe(events.put_nowait, ev))
        except KvstashError as e:
            yield ErrorEvent.of(e)
            return
        finished = False
        try:
            while True:
                ev = await events.get()
                yield ev
                if is_terminal(ev):
                    finished = True
                    return
        finally:
            if not finished:
                self.engine.scheduler.cancel(task_id)

    async def mark_public(self, input: dict) -> PrefixSharedEvent | ErrorEvent:
        """Share a prompt prefix with every tenant (runs as an engine task between other sessions' steps)."""
        loop = asyncio.get_running_loop()
        done: asyncio.Future = loop.create_future()
        self.engine.mark_public(input, lambda ev: loop.call_soon_threadsafe(lambda: done.done() or done.set_result(ev)))
        return await done

    async def prefix_match(self, tenant: str, input: dict) -> int:
        try:
            return int(await asyncio.wrap_future(self.engine.prefix_match(tenant, input)))
        except Exception:  # noqa: BLE001 - a routing hint only
            return 0

    async def drain(self):
        """Offload every session that is not busy (before this actor goes away)."""
        return await self._control(self.engine.drain())

    async def refresh_public(self):
        return await self._control(self.engine.refresh_public())

    async def _control(self, fut):
        """The engine future's value, or its `KvstashError` as an `ErrorEvent`."""
        try:
            return await asyncio.wrap_future(fut)
        except KvstashError as e:
            return ErrorEvent.of(e)

    async def info(self, tenant: str, session_id: str) -> SessionInfo | ErrorEvent:
        return await self._control(self.engine.info(tenant, session_id))

    async def pin(self, tenant: str, session_id: str, pinned: bool) -> bool | ErrorEvent:
        return await self._control(self.engine.pin(tenant, session_id, pinned))

    async def evict(self, tenant: str, session_id: str) -> bool | ErrorEvent:
        return await self._control(self.engine.evict(tenant, session_id))

    async def delete(self, tenant: str, session_id: str) -> bool | ErrorEvent:
        return await self._control(self.engine.delete(tenant, session_id))

    async def holds(self, tenant: str, session_id: str) -> bool:
        return self.engine.holds(tenant, session_id)

    async def occupancy(self) -> WorkerLoad:
        return self.engine.occupancy()

    async def metrics_snapshot(self) -> list[dict]:
        return self.engine.metrics_snapshot()

    async def list_sessions(self, tenant: str, cursor: int, limit: int) -> SessionPage | ErrorEvent:
        """A page of the tenant's stored sessions, from `cursor` (0: the start)."""
        loop = asyncio.get_running_loop()
        try:
            nxt, page = await loop.run_in_executor(None, self.engine.tier.list_sessions, tenant, cursor, limit)
        except Exception as e:  # noqa: BLE001
            return ErrorEvent("UNAVAILABLE", f"storage unavailable: {type(e).__name__}")
        return SessionPage(nxt, [StoredSession(m.session_id, len(m.tokens), m.created_at, m.updated_at, size)
                                 for m, size in page])

    async def storage_stats(self) -> StorageStats | ErrorEvent:
        try:
            return self.engine.storage_stats()
        except Exception as e:  # noqa: BLE001
            return ErrorEvent("UNAVAILABLE", f"storage unavailable: {type(e).__name__}")
