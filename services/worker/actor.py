"""`WorkerActor`: the Ray actor around an `Engine`.

Only plain data crosses Ray: dicts, lists, numbers and strings (never torch tensors, never exception
objects: errors travel as `{"type": "error", "error": {"code", "message"}}`). `generate` is a streaming
generator (`.options(num_returns="streaming")`); when its consumer goes away the generator is closed
and the engine task is cancelled, freeing the session.
"""

from __future__ import annotations

import asyncio
import logging
import os

import ray

from services.config import KvstashConfig, kvstash_home
from services.errors import KvstashError, to_wire
from services.worker.engine import Engine, GenerateCall

log = logging.getLogger(__name__)

ACTOR_PREFIX = "kvstash-worker-"


@ray.remote
class WorkerActor:
    def __init__(self, worker_id: str, cfg: dict):
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        self.worker_id = worker_id
        self.engine = Engine(KvstashConfig.from_dict(cfg), worker_id)
        run = kvstash_home() / "run"  # which process is which worker (operators, fault tests)
        run.mkdir(parents=True, exist_ok=True)
        (run / f"worker-{worker_id}.pid").write_text(str(os.getpid()))

    async def ready(self) -> dict:
        return {"worker": self.worker_id, "fingerprint": self.engine.runner.fingerprint,
                "device": str(self.engine.runner.device)}

    async def generate(self, call: dict):
        """Stream engine events for one call: `tokens`* then `done` or `error`."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        try:
            task_id = self.engine.submit(GenerateCall(**call), lambda ev: loop.call_soon_threadsafe(events.put_nowait, ev))
        except KvstashError as e:
            yield {"type": "error", "error": to_wire(e)}
            return
        finished = False
        try:
            while True:
                ev = await events.get()
                yield ev
                if ev["type"] in ("done", "error"):
                    finished = True
                    return
        finally:
            if not finished:
                self.engine.scheduler.cancel(task_id)

    async def mark_public(self, input: dict) -> dict:
        """Share a prompt prefix with every tenant (runs as an engine task between other sessions' steps)."""
        loop = asyncio.get_running_loop()
        done: asyncio.Future = loop.create_future()
        self.engine.mark_public(input, lambda ev: loop.call_soon_threadsafe(lambda: done.done() or done.set_result(ev)))
        ev = await done
        return {"error": ev["error"]} if ev["type"] == "error" else {"ok": ev}

    async def prefix_match(self, tenant: str, input: dict) -> int:
        try:
            return int(await asyncio.wrap_future(self.engine.prefix_match(tenant, input)))
        except Exception:  # noqa: BLE001 - a routing hint only
            return 0

    async def drain(self) -> dict:
        """Offload every session that is not busy (before this actor goes away)."""
        return await self._control(self.engine.drain())

    async def refresh_public(self) -> dict:
        return await self._control(self.engine.refresh_public())

    async def _control(self, fut) -> dict:
        try:
            return {"ok": await asyncio.wrap_future(fut)}
        except KvstashError as e:
            return {"error": to_wire(e)}

    async def info(self, tenant: str, session_id: str) -> dict:
        return await self._control(self.engine.info(tenant, session_id))

    async def pin(self, tenant: str, session_id: str, pinned: bool) -> dict:
        return await self._control(self.engine.pin(tenant, session_id, pinned))

    async def evict(self, tenant: str, session_id: str) -> dict:
        return await self._control(self.engine.evict(tenant, session_id))

    async def delete(self, tenant: str, session_id: str) -> dict:
        return await self._control(self.engine.delete(tenant, session_id))

    async def holds(self, tenant: str, session_id: str) -> bool:
        return self.engine.holds(tenant, session_id)

    async def occupancy(self) -> dict:
        return self.engine.occupancy()

    async def metrics_snapshot(self) -> list[dict]:
        return self.engine.metrics_snapshot()

    async def list_sessions(self, tenant: str, cursor: int, limit: int) -> dict:
        loop = asyncio.get_running_loop()
        try:
            nxt, page = await loop.run_in_executor(None, self.engine.tier.list_sessions, tenant, cursor, limit)
        except Exception as e:  # noqa: BLE001
            return {"error": {"code": "UNAVAILABLE", "message": f"storage unavailable: {type(e).__name__}"}}
        return {"ok": {"cursor": nxt, "sessions": [
            {"session_id": m.session_id, "token_count": len(m.tokens), "created_at": m.created_at,
             "last_used_at": m.updated_at, "redis_bytes": size} for m, size in page]}}

    async def storage_stats(self) -> dict:
        try:
            return {"ok": self.engine.storage_stats()}
        except Exception as e:  # noqa: BLE001
            return {"error": {"code": "UNAVAILABLE", "message": f"storage unavailable: {type(e).__name__}"}}
