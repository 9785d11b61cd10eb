"""`WindowStats` (services/bench/common.py): what a closed-loop benchmark counts inside its measured window."""

import pytest

from services.bench.common import WindowStats


def test_tokens_count_inside_the_window_and_latencies_of_calls_started_in_it():
    stats = WindowStats(10.0, 20.0)
    stats.call(8.0, [9.0, 9.5, 10.0, 10.5], ok=True)  # started before: 2 tokens count, no latency
    stats.call(12.0, [12.5, 13.0, 13.25], ok=True)  # inside: 3 tokens, TTFT 0.5, gaps 0.5 and 0.25
    stats.call(19.0, [19.75, 20.0, 21.0], ok=True)  # runs past the end: 1 token, TTFT 0.75, gaps 0.25 and 1.0
    stats.call(15.0, [], ok=False)  # failed before a token
    row = stats.row()
    assert row["tokens_per_s"] == pytest.approx(6 / 10)
    assert (row["calls"], row["errors"]) == (2, 1)
    assert (row["ttft_p50_s"], row["ttft_p99_s"]) == (0.75, 0.75)  # sorted [0.5, 0.75]: index floor(q * 2)
    assert (row["tpot_p50_s"], row["tpot_p99_s"]) == (0.5, 1.0)  # sorted [0.25, 0.25, 0.5, 1.0]


def test_an_empty_window_has_no_latencies():
    row = WindowStats(0.0, 1.0).row()
    assert row["tokens_per_s"] == 0 and row["calls"] == 0
    assert row["ttft_p99_s"] != row["ttft_p99_s"]  # NaN
