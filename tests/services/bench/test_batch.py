"""`kvstash bench batch`: its answer lengths (a fixed N or a LO-HI range; bad forms are refused clearly) and the
garbage-collector pauses it reports per row."""

import pytest

from services.bench.batch import answer_lengths


def test_a_fixed_length_and_a_range():
    assert answer_lengths("32") == (32, 32)
    assert answer_lengths("64-192") == (64, 192)


@pytest.mark.parametrize("bad", ["", "x", "0", "9-3", "4-x", "-5"])
def test_bad_lengths_are_refused(bad):
    with pytest.raises(SystemExit, match="--new-tokens"):
        answer_lengths(bad)


def test_the_garbage_collectors_pauses_inside_the_window_are_reported():
    """A row says how long the collector stood the process still inside its window, and how many full
    collections it ran there (services/worker/gc_tuning.py's GcPauses feeds it); pauses outside it are not
    counted."""
    import gc
    import time

    from services.bench.batch import _closed_loop, _GcWindow
    from services.worker.gc_tuning import GcPauses

    now = time.monotonic()
    inside, before = _GcWindow(now - 1.0, now + 3600.0), _GcWindow(now - 2.0, now - 1.0)
    pauses = [GcPauses(w).install() for w in (inside, before)]
    try:
        gc.collect(2)
        gc.collect(0)
    finally:
        for p in pauses:
            p.remove()
    assert inside.full == 1 and inside.total >= inside.longest > 0
    assert (before.total, before.full) == (0.0, 0)
    row = _closed_loop(1, seconds=0.1, warmup=0.0, one_call=lambda rng: ([time.monotonic()], True))
    assert row["gc_pause_s"] >= row["gc_pause_max_s"] >= 0 and row["gc_full_collections"] >= 0
