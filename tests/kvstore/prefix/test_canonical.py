import pytest

from kvstore.prefix.block_hash import BlockGrid
from kvstore.prefix.canonical import adoption_points


def test_adoption_points_are_chunk_multiples_on_block_boundaries_before_the_last_token():
    assert adoption_points(1200, BlockGrid(32), 512) == [512, 1024]
    assert adoption_points(1024, BlockGrid(32), 512) == [512]  # one token must be left to run
    assert adoption_points(2000, BlockGrid(32, sinks=4), 512) == []  # sinks shift blocks off the chunk grid
    assert adoption_points(2000, BlockGrid(32, sinks=32), 512) == [512, 1024, 1536]
    with pytest.raises(ValueError, match="multiple of block_tokens"):
        adoption_points(2000, BlockGrid(96), 512)
