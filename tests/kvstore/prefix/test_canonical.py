import pytest

from kvstore.prefix.block_hash import BlockGrid
from kvstore.prefix.canonical import adopted_schedule, adoption_points, canonical_tokens, passes
from kvstore.schedule import SEAL


def test_passes_end_at_chunk_multiples():
    assert passes(0, 1100, 512) == [512, 512, 76]
    assert passes(1100, 1200, 512) == [100]
    assert passes(1000, 1600, 512) == [24, 512, 64]
    assert passes(5, 5, 512) == []
    assert sum(passes(3, 5000, 256)) == 4997


def test_canonical_tokens_count_leading_complete_chunks():
    assert canonical_tokens([512, 512, 76, 1, 1], 512) == 1024
    assert canonical_tokens([512, 512, SEAL, 128, 1], 512) == 1024
    assert canonical_tokens([100, 512], 512) == 0
    assert canonical_tokens(adopted_schedule(1536, 512), 512) == 1536
    assert adopted_schedule(1024, 512) == [512, 512, SEAL]


def test_adoption_points_are_chunk_multiples_on_block_boundaries_before_the_last_token():
    assert adoption_points(1200, BlockGrid(32), 512) == [512, 1024]
    assert adoption_points(1024, BlockGrid(32), 512) == [512]  # one token must be left to run
    assert adoption_points(2000, BlockGrid(32, sinks=4), 512) == []  # sinks shift blocks off the chunk grid
    assert adoption_points(2000, BlockGrid(32, sinks=32), 512) == [512, 1024, 1536]
    with pytest.raises(ValueError, match="multiple of block_tokens"):
        adoption_points(2000, BlockGrid(96), 512)
