"""The worker's garbage collector (services/worker/gc_tuning.py): tuned for serving and back, every collection's
pause observed by generation. The engine tests use a real Engine (tiny model, real redis-server)."""

import gc

from prometheus_client import CollectorRegistry, Histogram

from services.worker.gc_tuning import YOUNG_THRESHOLD, GcPauses, GcTuning
from tests.services.worker.test_session_store import make_engine, run


def _observed(registry, name: str, generation: str) -> tuple[float, float]:
    """(seconds, collections) a pause histogram holds for one generation."""
    get = registry.get_sample_value
    return get(f"{name}_sum", {"generation": generation}) or 0.0, get(f"{name}_count", {"generation": generation}) or 0


def test_tuning_freezes_the_live_heap_raises_the_young_threshold_and_undoes_both():
    before = gc.get_threshold()
    tuning = GcTuning()
    try:
        frozen = tuning.apply()
        assert frozen == gc.get_freeze_count() > 1000  # this process's modules, at least
        assert gc.get_threshold() == (YOUNG_THRESHOLD, *before[1:])
        assert tuning.apply() == frozen  # once
        gc.collect()
        assert gc.get_freeze_count() == frozen  # a collection leaves frozen objects alone
    finally:
        tuning.undo()
    assert gc.get_freeze_count() == 0 and gc.get_threshold() == before and not tuning.applied
    tuning.undo()  # idempotent


def test_every_collection_is_observed_by_generation_while_installed():
    registry = CollectorRegistry()
    pauses = GcPauses(Histogram("pauses", "test", ["generation"], registry=registry)).install()
    try:
        gc.collect(0)
        gc.collect(2)
        gc.collect(2)
        seconds, n = _observed(registry, "pauses", "2")
        assert n == 2 and seconds > 0
        assert _observed(registry, "pauses", "0")[1] >= 1
    finally:
        pauses.remove()
    pauses.remove()  # idempotent
    gc.collect(2)
    assert _observed(registry, "pauses", "2")[1] == 2  # removed: no longer observed
    assert pauses._on_collection not in gc.callbacks


def test_an_engine_tunes_the_collector_observes_pauses_and_undoes_the_tuning_when_it_closes(tiny_model_dir,
                                                                                          redis_server):
    before = gc.get_threshold()
    eng = make_engine(tiny_model_dir, redis_server.url)
    try:
        assert gc.get_freeze_count() > 10_000  # the model, torch, transformers
        assert gc.get_threshold()[0] == YOUNG_THRESHOLD
        run(eng, "acme", "gc", list(range(1000, 1030)), n=4)
        gc.collect(2)
        assert _observed(eng.metrics.registry, "kvstash_worker_gc_pause_seconds", "2")[1] >= 1
    finally:
        eng.close()
    assert gc.get_freeze_count() == 0 and gc.get_threshold() == before
    assert eng._gc._on_collection not in gc.callbacks


def test_an_engine_told_not_to_tune_leaves_the_collector_alone(tiny_model_dir, redis_server):
    before = gc.get_threshold(), gc.get_freeze_count()
    eng = make_engine(tiny_model_dir, redis_server.url, batch={"tune_gc": False})
    try:
        assert (gc.get_threshold(), gc.get_freeze_count()) == before
        assert run(eng, "acme", "gc2", list(range(1000, 1030)), n=4)[0]
    finally:
        eng.close()
