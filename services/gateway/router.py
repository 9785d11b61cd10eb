"""`Router`: which worker serves a call.

Placement, in order: (1) session affinity: the worker that holds the session hot (remembered, or found
by asking the workers); (2) for a new session, prefix locality: each live worker is asked how many of
the prompt's tokens it holds hot (its prefix trie), and the best score wins — hot tokens minus
`gateway.prefix_tokens_per_request` for every request running or queued there, so a long shared prefix
outweighs a little load but a busy worker loses to an idle one; (3) otherwise the least-loaded live
worker (fewest streams this gateway has open on it, then the smallest polled queue depth), which
restores the session from Redis. Workers are Ray named actors (`services.wire.actor_name(i)`) in the
configured namespace; the router gets their handles from a factory (worker index -> actor handle) handed
in by whoever starts the stack (`services.runtime.workers.WorkerSpawner`, which creates them with
`get_if_exists`), or, without one, looks them up by name. It imports no worker code: messages to and
from the workers are `services.wire` types.

Invariants: a worker whose actor died is dropped from routing and from the affinity table; `poll` then
asks the factory for it again (same name) and returns it to routing once its model is loaded. On an
external Ray cluster (`ray.address` set) the actors are detached, so they outlive the gateway that
created them: gateways can restart, roll or run side by side, all finding the same workers by name.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import ray

from services.config import KvstashConfig
from services.errors import Unavailable
from services.metrics import WorkerMetricsCollector
from services.wire import WorkerLoad, actor_name

log = logging.getLogger(__name__)

Spawn = Callable[[int], object]  # worker index -> its actor handle (created, or found by name)


@dataclass
class WorkerHandle:
    id: str
    actor: object
    load: WorkerLoad = field(default_factory=WorkerLoad)  # the worker's last polled load
    alive: bool = True
    inflight: int = 0  # streams this gateway has open on the worker (exact, not polled)


class Router:
    def __init__(self, workers: list[WorkerHandle], collector: WorkerMetricsCollector | None = None,
                 spawn: Spawn | None = None, ready_timeout_s: float = 600.0, tokens_per_request: int = 256):
        self.workers = {w.id: w for w in workers}
        self.affinity: dict[tuple[str, str], str] = {}
        self.collector = collector or WorkerMetricsCollector()
        self._rr = itertools.count()
        self._spawn = spawn  # worker index -> actor handle (None: dead workers stay dead)
        self._ready_timeout_s = ready_timeout_s
        self._reviving: dict[str, asyncio.Task] = {}
        self.tokens_per_request = tokens_per_request
        self.prefix_routed = 0  # new sessions placed for prefix locality against plain least-loaded

    @classmethod
    async def start(cls, cfg: KvstashConfig, collector: WorkerMetricsCollector | None = None,
                    spawn: Spawn | None = None, ready_timeout_s: float = 600.0) -> Router:
        """Get the `cfg.ray.num_workers` worker actors from `spawn` (default: find each by name) and wait
        until each has loaded its model."""
        if spawn is None:
            namespace = cfg.ray.namespace

            def spawn(i: int):
                return ray.get_actor(actor_name(i), namespace=namespace)

        handles = [WorkerHandle(f"w{i}", spawn(i)) for i in range(cfg.ray.num_workers)]
        infos = await asyncio.wait_for(asyncio.gather(*(h.actor.ready.remote() for h in handles)), ready_timeout_s)
        for info in infos:
            log.info("worker %s ready on %s", info.worker, info.device)
        return cls(handles, collector, spawn, ready_timeout_s, cfg.gateway.prefix_tokens_per_request)

    def live(self) -> list[WorkerHandle]:
        return [w for w in self.workers.values() if w.alive]

    def mark_dead(self, worker: WorkerHandle) -> None:
        if worker.alive:
            log.error("worker %s is gone; dropping it from routing", worker.id)
        worker.alive = False
        self.affinity = {k: v for k, v in self.affinity.items() if v != worker.id}
        self.collector.update(worker.id, None)

    async def locate(self, tenant: str, session_id: str) -> WorkerHandle | None:
        """The live worker holding the session hot, if any."""
        wid = self.affinity.get((tenant, session_id))
        if wid is not None and self.workers[wid].alive:
            return self.workers[wid]
        live = self.live()
        results = await asyncio.gather(*(w.actor.holds.remote(tenant, session_id) for w in live), return_exceptions=True)
        for w, r in zip(live, results):
            if isinstance(r, ray.exceptions.RayActorError):
                self.mark_dead(w)
            elif r is True:
                self.affinity[(tenant, session_id)] = w.id
                return w
        return None

    @staticmethod
    def busy(h: WorkerHandle) -> int:
        """Requests on a worker: this gateway's open streams, or the polled depth when that is larger
        (other gateways' traffic)."""
        return max(h.inflight, h.load.queue_depth)

    async def place(self, tenant: str, session_id: str, new_input: dict | None = None,
                    fork_of: str = "") -> WorkerHandle:
        """Affinity first (for a fork, its parent's: the parent's device copy is cloned there); then, for a
        new session's `new_input`, prefix locality; else the least loaded live worker (ties broken
        round-robin)."""
        w = await self.locate(tenant, fork_of or session_id)
        if w is not None:
            self.affinity[(tenant, session_id)] = w.id
            return w
        live = self.live()
        if not live:
            raise Unavailable("no worker is available")
        start = next(self._rr) % len(live)
        rotated = live[start:] + live[:start]
        # this gateway's open streams first (exact and current), then the polled depth (other gateways' load)
        w = min(rotated, key=lambda h: (h.inflight, h.load.queue_depth))
        if new_input is not None and len(live) > 1:
            hot = await self._hot_tokens(rotated, tenant, new_input)
            if any(hot):
                score = {h.id: n - self.tokens_per_request * self.busy(h) for h, n in zip(rotated, hot)}
                best = max(rotated, key=lambda h: score[h.id])
                if score[best.id] > score[w.id]:
                    w = best
                    self.prefix_routed += 1
        self.affinity[(tenant, session_id)] = w.id
        return w

    async def _hot_tokens(self, workers: list[WorkerHandle], tenant: str, new_input: dict) -> list[int]:
        """Each worker's hot prefix tokens for the prompt (0 for a worker that is slow to answer)."""
        calls = [w.actor.prefix_match.remote(tenant, new_input) for w in workers]
        done = await asyncio.gather(*(asyncio.wait_for(asyncio.wrap_future(c.future()), 1.0) for c in calls),
                                    return_exceptions=True)
        return [r if isinstance(r, int) else 0 for r in done]

    def forget(self, tenant: str, session_id: str) -> None:
        self.affinity.pop((tenant, session_id), None)

    def _revive(self, w: WorkerHandle) -> None:
        """Get a dead worker's actor again from the factory (same name) and put it back once its model is
        loaded."""
        if self._spawn is None or w.id in self._reviving:
            return

        async def run():
            try:
                try:  # a dead actor keeps its name until killed; free it for the new one
                    ray.kill(w.actor, no_restart=True)
                except Exception:  # noqa: BLE001
                    pass
                actor = self._spawn(int(w.id[1:]))
                await asyncio.wait_for(actor.ready.remote(), self._ready_timeout_s)
                w.actor, w.load, w.alive = actor, WorkerLoad(), True
                log.warning("worker %s is back", w.id)
            except Exception as e:  # noqa: BLE001  (the next poll tries again)
                log.error("worker %s could not be created again: %s", w.id, e)
            finally:
                self._reviving.pop(w.id, None)

        self._reviving[w.id] = asyncio.get_running_loop().create_task(run())

    async def poll(self) -> None:
        """Refresh load and metrics of every live worker; start reviving dead ones."""
        for w in self.workers.values():
            if not w.alive:
                self._revive(w)
        live = self.live()
        loads = await asyncio.gather(*(w.actor.occupancy.remote() for w in live), return_exceptions=True)
        snaps = await asyncio.gather(*(w.actor.metrics_snapshot.remote() for w in live), return_exceptions=True)
        for w, load, snap in zip(live, loads, snaps):
            if isinstance(load, ray.exceptions.RayActorError) or isinstance(snap, ray.exceptions.RayActorError):
                self.mark_dead(w)
                continue
            if isinstance(load, WorkerLoad):
                w.load = load
            if isinstance(snap, list):
                self.collector.update(w.id, snap)
