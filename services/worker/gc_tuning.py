"""Python's cyclic garbage collector in a worker: tuned for serving, and every pause measured.

CPython stops every thread for each collection. A worker's heap after start-up holds ~700,000 objects that are
never garbage (the model's modules and parameters, transformers, torch, Ray, gRPC), and a full (generation 2)
collection walks all of them, mid-pass for the engine thread; and a decode pass allocates thousands of
short-lived objects (tensors, window parts), so with CPython's default thresholds (a young collection every
700 net allocations) several collections run inside every pass, each promoting whatever is alive at that
instant towards the oldest generation and so triggering full collections of objects that die a moment later.
Measured in `kvstash bench batch` (docs/BENCHMARKS.md, "Garbage-collector pauses"), 16 sessions, 30 s: 2.9 s
(fp32) and 3.8 s (bf16) of collector pauses, the longest 330-340 ms; with `GcTuning`, 0.3 s and none full. The
collections in a measured window reclaimed nothing: the per-step garbage is freed by reference counting.

`GcTuning.apply` collects once, moves every object alive to the permanent generation (`gc.freeze`, as vLLM,
SGLang and Ray Serve do after warm-up: frozen objects are still freed by reference counting, only no longer
walked), and raises the young generation's threshold to `YOUNG_THRESHOLD` allocations (SGLang's
`--gc-threshold`), so a pass's transient objects die before a collection sees them. `GcPauses` times every
collection of the process into a histogram by generation (`kvstash_worker_gc_pause_seconds`), so what the
collector costs is measured, not assumed.

Invariants:
- Collection stays on: objects made after `apply` are collected as before, less often.
- `undo` restores what `apply` changed (the frozen objects go back to the oldest generation, where a full
  collection can free a cycle among them; the thresholds return to their values before): an engine that tuned
  undoes it when it closes, so a process that builds many engines (tests, benchmarks) never keeps a closed
  engine's cyclic garbage frozen.
- A `GcPauses` observes only while installed; `remove` is idempotent.
"""

from __future__ import annotations

import gc
import time

YOUNG_THRESHOLD = 50_000  # net allocations between young-generation collections (CPython's default: 700)


class GcTuning:
    """The collector's settings for serving (module docstring): `apply` once after start-up, `undo` at close."""

    def __init__(self):
        self._before: tuple[int, int, int] | None = None

    @property
    def applied(self) -> bool:
        return self._before is not None

    def apply(self) -> int:
        """Collect, freeze every object alive, raise the young threshold; returns how many objects are frozen."""
        if self._before is None:
            self._before = gc.get_threshold()
            gc.collect()
            gc.freeze()
            gc.set_threshold(YOUNG_THRESHOLD, *self._before[1:])
        return gc.get_freeze_count()

    def undo(self) -> None:
        if self._before is not None:
            gc.unfreeze()
            gc.set_threshold(*self._before)
            self._before = None


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
