"""Python's cyclic garbage collector in a worker: the start-up heap frozen, every collection's pause measured.

A worker's heap after start-up holds ~540,000 container objects that are never garbage: the model's modules
and parameters, transformers, torch, Ray, gRPC. CPython stops every thread for each collection, and a full
(generation 2) collection walks every tracked object, mid-pass for the engine thread. Measured on SmolLM2 in
`kvstash bench batch` (docs/BENCHMARKS.md): full collections of that heap took up to 250-340 ms each during
start-up. The per-step garbage of a decode pass (tensors, window parts) is freed by reference counting; the
collections in a measured window reclaimed nothing.

`freeze_startup_heap` collects once and moves every object alive to the permanent generation (`gc.freeze`),
as vLLM, SGLang and Ray Serve do after warm-up: frozen objects are still freed by reference counting, they are
only no longer walked. `GcPauses` times every collection of the process into a histogram by generation
(`kvstash_worker_gc_pause_seconds`), so what the collector costs is measured, not assumed.

Invariants:
- Collection stays on: objects made after the freeze are collected as before.
- `thaw` undoes a freeze (the objects go back to the oldest generation, where a full collection can free a
  cycle among them): an engine that froze thaws when it closes, so a process that builds many engines (tests,
  benchmarks) never keeps a closed engine's cyclic garbage frozen.
- A `GcPauses` observes only while installed; `remove` is idempotent.
"""

from __future__ import annotations

import gc
import time


def freeze_startup_heap() -> int:
    """Collect, then move every object alive to the permanent generation; returns how many are frozen."""
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()


def thaw() -> None:
    """Move frozen objects back to the oldest generation (`gc.unfreeze`)."""
    gc.unfreeze()


class GcPauses:
    """Observes each collection's pause, in seconds, into `histogram` labelled by generation ("0", "1", "2").

    CPython runs a collection holding the GIL, start to stop on one thread, so a start and its stop are never
    interleaved with another collection's."""

    def __init__(self, histogram):
        self.histogram = histogram
        self._t0 = 0.0
        self._installed = False

    def install(self) -> GcPauses:
        if not self._installed:
            gc.callbacks.append(self._on_collection)
            self._installed = True
        return self

    def remove(self) -> None:
        if self._installed:
            gc.callbacks.remove(self._on_collection)
            self._installed = False

    def _on_collection(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._t0 = time.perf_counter()
        else:
            self.histogram.labels(str(info["generation"])).observe(time.perf_counter() - self._t0)
