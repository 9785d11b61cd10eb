import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvstore.quant.pack import pack, packed_size, unpack


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 6, 7, 8])
@pytest.mark.parametrize("n", [1, 7, 8, 9, 64, 100])
def test_pack_roundtrip_exact(bits, n):
    g = torch.Generator().manual_seed(bits * 1000 + n)
    codes = torch.randint(0, 1 << bits, (2, 3, n), generator=g, dtype=torch.uint8)
    packed = pack(codes, bits)
    assert packed.dtype == torch.uint8
    assert packed.shape == (2, 3, packed_size(n, bits))
    assert torch.equal(unpack(packed, bits, n), codes)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_pack_is_dense(bits):
    # 3-bit codes really take 3/8 byte each: 64 codes -> 24 bytes.
    codes = torch.zeros(1, 64, dtype=torch.uint8)
    assert pack(codes, bits).numel() == 64 * bits // 8


def test_pack_extremes_and_layout():
    codes = torch.tensor([[7, 0, 7, 0, 7, 0, 7, 0]], dtype=torch.uint8)
    packed = pack(codes, 3)
    # little-endian bit order: code i occupies bits [3i, 3i+3)
    word = sum(int(b) << (8 * i) for i, b in enumerate(packed[0]))
    assert [(word >> (3 * i)) & 7 for i in range(8)] == codes[0].tolist()


def test_pack_rejects_bad_input():
    with pytest.raises(TypeError):
        pack(torch.zeros(8, dtype=torch.int32), 4)
    with pytest.raises(ValueError):
        pack(torch.zeros(8, dtype=torch.uint8), 9)
    with pytest.raises(ValueError, match="does not hold"):
        unpack(torch.zeros(5, dtype=torch.uint8), 4, 8)


@settings(max_examples=60, deadline=None)
@given(bits=st.integers(1, 8), data=st.data())
def test_pack_property(bits, data):
    vals = data.draw(st.lists(st.integers(0, (1 << bits) - 1), min_size=1, max_size=40))
    codes = torch.tensor(vals, dtype=torch.uint8)
    assert unpack(pack(codes, bits), bits, len(vals)).tolist() == vals
