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
    collections it ran there (services/worker/gc_tuning.py feeds it)."""
    import gc
    import time

    from services.bench.batch import _closed_loop, _GcWindow

    def one_call(rng):
        gc.collect(2)
        return [time.monotonic()], True

    row = _closed_loop(1, seconds=0.3, warmup=0.0, one_call=one_call)
    assert row["gc_full_collections"] >= 1 and row["gc_pause_s"] >= row["gc_pause_max_s"] > 0
    closed = _GcWindow(0.0, 0.0)  # an empty window takes nothing
    closed.labels("2").observe(1.0)
    assert (closed.total, closed.full) == (0.0, 0)
