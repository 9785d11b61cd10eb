"""`kvstash bench batch`'s answer lengths: a fixed N or a LO-HI range; bad forms are refused clearly."""

import pytest

from services.bench.batch import answer_lengths


def test_a_fixed_length_and_a_range():
    assert answer_lengths("32") == (32, 32)
    assert answer_lengths("64-192") == (64, 192)


@pytest.mark.parametrize("bad", ["", "x", "0", "9-3", "4-x", "-5"])
def test_bad_lengths_are_refused(bad):
    with pytest.raises(SystemExit, match="--new-tokens"):
        answer_lengths(bad)
