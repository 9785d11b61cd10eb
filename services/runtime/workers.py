"""`WorkerSpawner`: creates (or finds) the worker actors; handed to the gateway's `Router` as its factory.

The gateway routes to worker actors but never creates them itself: it imports no worker code. Whoever
starts the stack (`LocalStack`, i.e. `kvstash up`) builds a spawner and passes it to `Gateway`; without
one the gateway only finds actors that already exist, by name (`ray.get_actor`).

Invariants:
- Worker `i` is the Ray named actor `services.wire.actor_name(i)` with worker id f"w{i}", in the configured
  namespace, created with `get_if_exists`: a gateway restart (or a second gateway) finds the same actor.
- On an external Ray cluster (`ray.address` set) the actors are detached, so they outlive the gateway
  process that created them.
- A worker reserves `ray.num_cpus_per_worker` CPUs (1 when 0: whoever owns the Ray instance resolves 0,
  as `LocalStack` does), and Ray gives its torch as many threads.
- Importing this module (and `services.worker.actor`) loads no torch, transformers or numba: the actor
  imports its engine inside its own process.
"""

from __future__ import annotations

import ray

from services.config import KvstashConfig
from services.wire import actor_name


class WorkerSpawner:
    """`spawner(i)`: the handle of worker actor `i`, created with the configuration's resources if absent."""

    def __init__(self, cfg: KvstashConfig):
        self.cfg = cfg
        self._cfg_dict = cfg.to_dict()
        self._gpus: float | None = None

    def __call__(self, index: int):
        from services.worker.actor import WorkerActor  # light: the engine is imported in the actor's process

        ray_cfg = self.cfg.ray
        if self._gpus is None:
            gpus = ray_cfg.num_gpus_per_worker
            self._gpus = gpus if gpus >= 0 else (1 if ray.cluster_resources().get("GPU", 0) > 0 else 0)
        return WorkerActor.options(
            name=actor_name(index), namespace=ray_cfg.namespace, get_if_exists=True,
            lifetime="detached" if ray_cfg.address else None,
            num_cpus=ray_cfg.num_cpus_per_worker or 1.0, num_gpus=self._gpus, max_restarts=0,
        ).remote(f"w{index}", self._cfg_dict)

