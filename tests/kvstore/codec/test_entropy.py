"""The lossless KV block coder (kvstore.codec.entropy): bit-exact round trips, compression of a real block,
and rejection of every malformed payload."""

import struct
import zlib

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvstore.codec import ans, simd
from kvstore.codec.container import ContainerError
from kvstore.codec.entropy import CODER_ID, decode_block, encode_block
from kvstore.quant.pack import pack, unpack
from kvstore.quant.side import SidePlan, seal

# The bound on real SmolLM2 blocks (<= 4.45 bits per element at INT4 g32) is asserted by
# tests/services/bench/test_codec.py, which builds a real session.


def layout_of(tensors):
    return [(n, a.dtype, a.shape) for n, a in tensors]


def roundtrip(tensors, bits):
    payload = encode_block(tensors, bits)
    back = decode_block(payload, layout_of(tensors), bits)
    assert [n for n, _ in back] == [n for n, _ in tensors]
    for (name, a), (_, b) in zip(tensors, back):
        assert b.dtype == a.dtype and b.shape == a.shape and b.tobytes() == a.tobytes(), name
        assert b.flags.c_contiguous and b.flags.writeable
    return payload


def sealed_block(layers=2, h=2, b=64, d=16, kb=4, vb=4, g=32, gv=8, seed=0, outliers=0.0):
    """A block as the cache seals it: smooth RoPE-like keys with channel offsets, noisy values."""
    gen = torch.Generator().manual_seed(seed)
    out, bits = [], {}
    for layer in range(layers):
        t = torch.arange(b, dtype=torch.float32)[:, None]
        freq = 1.0 / 100 ** (torch.arange(d // 2) / (d // 2))
        amp = torch.rand(d // 2, generator=gen) * 3
        ang = t * freq + torch.rand(d // 2, generator=gen) * 6
        k = torch.cat([amp * torch.cos(ang), amp * torch.sin(ang)], -1) + torch.randn(b, d, generator=gen) * 0.3
        k = (k + torch.randn(d, generator=gen) * 2).expand(1, h, b, d).contiguous()
        v = torch.randn(1, h, b, d, generator=gen)
        for side, x, kbits, grp, dim in (("k", k, kb, g, -2), ("v", v, vb, gv, -1)):
            res = seal(x, SidePlan(bits=kbits, group=grp, dim=dim, block=g, outliers=outliers))
            for field in ("codes", "scale", "zero", "oidx", "oval", "fp"):
                if field in res:
                    out.append((f"{layer}.{side}_{field}", res[field].numpy()))
            bits[f"{layer}.{side}_codes"] = kbits
    return out, bits


def test_sealed_blocks_compress_and_round_trip():
    tensors, bits = sealed_block()
    payload = roundtrip(tensors, bits)
    assert len(payload) < 0.95 * sum(a.nbytes for _, a in tensors)  # even this small block, tables included
    assert isinstance(CODER_ID, int) and encode_block(tensors, bits) == payload  # deterministic


@pytest.mark.parametrize("kb,vb", [(2, 2), (3, 3), (8, 4), (4, 8), (8, 8)])
def test_other_bit_widths(kb, vb):
    roundtrip(*sealed_block(kb=kb, vb=vb, gv=16, seed=kb * 10 + vb))


def test_outlier_side_tables_and_full_precision_sides():
    tensors, bits = sealed_block(outliers=0.02, seed=3)
    assert any(n.endswith("_oidx") for n, _ in tensors)
    rng = np.random.default_rng(0)
    tensors += [("2.k_fp", rng.standard_normal((1, 2, 64, 16)).astype(np.float32)),
                ("2.v_fp", rng.integers(-2**15, 2**15, (1, 2, 64, 16)).astype(np.int16)),  # bfloat16 bits
                ("3.k_fp", rng.standard_normal((1, 2, 64, 16)).astype(np.float16)),
                ("3.k_oidx", np.zeros((2, 0), np.int16)), ("3.k_oval", np.zeros((2, 0), np.float16))]
    roundtrip(tensors, bits)


def test_codes_equal_the_packers_layout():
    codes = torch.randint(0, 8, (1, 2, 32, 16), dtype=torch.uint8)
    packed = pack(codes, 3).numpy()
    sym = ans.unpack_rows(packed.reshape(-1, 32, packed.shape[-1]), 3)
    assert np.array_equal(sym.reshape(2, 16, 32), codes[0].numpy().transpose(0, 2, 1))
    assert np.array_equal(ans.pack_rows(sym, 3, (2, 32, 6)), packed[0])
    assert torch.equal(unpack(torch.from_numpy(packed), 3, 16), codes)


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("n", [8, 16, 24, 64])
def test_pack_rows_equals_the_packer_for_every_width(bits, n):
    """The numba packer of restored rows gives `kvstore.quant.pack`'s bytes, bit for bit (and unpack_rows inverts it)."""
    g = torch.Generator().manual_seed(bits * 100 + n)
    codes = torch.randint(0, 1 << bits, (3, 5, n), dtype=torch.uint8, generator=g)  # [R, T, n]
    packed = pack(codes, bits).numpy()
    sym = np.ascontiguousarray(codes.numpy().transpose(0, 2, 1)).reshape(-1)  # channel-major, as decoded
    got = ans.pack_rows(sym, bits, packed.shape)
    assert got.dtype == np.uint8 and got.tobytes() == packed.tobytes()
    assert np.array_equal(ans.unpack_rows(packed, bits), sym)


fp16_patterns = st.sampled_from([0x0000, 0x8000, 0x7C00, 0xFC00, 0x7E00, 0xFE01, 0x0001, 0x7BFF, 0x3C00, 0xBC00])


@st.composite
def random_blocks(draw):
    """Any arrays of the block dtypes and shapes: random or constant codes, fp16 edge patterns, odd sizes."""
    h, g = draw(st.integers(1, 3)), draw(st.sampled_from([1, 2, 4, 8]))
    b = g * draw(st.integers(1, 4))
    d = draw(st.sampled_from([1, 3, 8, 16]))
    seed = draw(st.integers(0, 2**31))
    rng = np.random.default_rng(seed)
    tensors, bits = [], {}
    for layer in range(draw(st.integers(1, 2))):
        for side in "kv":
            kb = draw(st.sampled_from([1, 2, 3, 4, 8]))
            m = d if kb == 8 else -(-d // 8) * kb
            fill = draw(st.sampled_from(["random", "zeros", "ones"]))
            codes = {"random": rng.integers(0, 256, (1, h, b, m)), "zeros": np.zeros((1, h, b, m)),
                     "ones": np.full((1, h, b, m), 255)}[fill].astype(np.uint8)
            gd = max(1, d // draw(st.sampled_from([1, 2])))
            mshape = (1, h, b // g, d) if side == "k" else (1, h, b, gd)
            meta = []
            for _ in range(2):
                a = rng.integers(0, 2**16, mshape).astype(np.uint16)
                if draw(st.booleans()):
                    a.reshape(-1)[: min(a.size, 10)] = [draw(fp16_patterns) for _ in range(min(a.size, 10))]
                meta.append(a.view(np.float16))
            tensors += [(f"{layer}.{side}_codes", codes), (f"{layer}.{side}_scale", meta[0]),
                        (f"{layer}.{side}_zero", meta[1])]
            bits[f"{layer}.{side}_codes"] = kb
    return tensors, bits


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(random_blocks())
def test_any_arrays_round_trip(block):
    roundtrip(*block)


@pytest.fixture(scope="module")
def coded():
    """A coded block, in the format written (the only one read)."""
    tensors, bits = sealed_block(layers=2, b=32, seed=5, outliers=0.02)
    return tensors, bits, encode_block(tensors, bits)


def test_only_the_current_format_is_read():
    """Formats 1 and 2 (pre-release) were dropped: a payload claiming them is refused, not misread."""
    tensors, bits = sealed_block(layers=2, b=32, seed=7)
    payload = roundtrip(tensors, bits)
    assert payload[4] == 3  # the format byte after the CRC
    for fmt in (1, 2, 4):
        bad = bytearray(payload)
        bad[4] = fmt
        bad[:4] = struct.pack("<I", zlib.crc32(bytes(bad[4:])))
        with pytest.raises(ContainerError, match="unknown block format"):
            decode_block(bytes(bad), layout_of(tensors), bits)


def _stream_lanes(payload: bytes) -> int:  # format 3: stream 0's lane count (after CRC, format, sizes, context)
    assert payload[4] == 3
    return payload[4 + 1 + 12 + 1]


@pytest.mark.parametrize("kb,vb,b", [(4, 4, 128), (8, 2, 64), (3, 4, 128)])
def test_large_streams_take_the_vector_layout_and_round_trip(kb, vb, b):
    """Streams big enough for simd.LANES lanes' states (SIMD_MAX_COST) are coded for the vector decoder; rows
    beyond the last whole group of lanes (h * d * layers % LANES) go to lane 0. Small ones keep NL lanes."""
    tensors, bits = sealed_block(layers=12, h=3, d=40, b=b, kb=kb, vb=vb, gv=8, seed=kb + vb + b)
    payload = roundtrip(tensors, bits)
    assert _stream_lanes(payload) == simd.LANES and (12 * 3 * 40) % simd.LANES
    small = roundtrip(*sealed_block(layers=1, h=1, d=16, b=32, seed=3))
    assert _stream_lanes(small) == ans.NL


def test_a_block_of_smollm2_shape_codes_scale_zero_residuals_on_16_lanes():
    tensors, bits = sealed_block(layers=30, h=3, d=64, b=128, seed=4)
    payload = roundtrip(tensors, bits)
    at = 4 + 1 + 12 + 1  # stream 0: lanes and words of its codes, then of its scale and zero residuals
    assert (payload[at], payload[at + 5], payload[at + 10]) == (simd.LANES, 16, 16)


def test_a_vector_stream_with_a_wrong_lane_count_is_refused():
    tensors, bits = sealed_block(layers=4, h=4, d=64, b=128, seed=2)
    payload = bytearray(encode_block(tensors, bits))
    at = 4 + 1 + 12 + 1
    assert payload[at] == simd.LANES
    for where, lanes in [(at, x) for x in (ans.NL, 16, 0, 7, 255)] + [(at + 5, x) for x in (0, 64, 3)]:
        bad = bytearray(payload)  # stream 0's codes, then its scale residuals
        bad[where] = lanes
        bad[:4] = struct.pack("<I", zlib.crc32(bytes(bad[4:])))
        with pytest.raises(ContainerError, match="corrupt rANS stream|impossible"):
            decode_block(bytes(bad), layout_of(tensors), bits)


def test_truncated_or_extended_payloads_are_rejected(coded):
    tensors, bits, payload = coded
    for n in list(range(0, 40)) + list(range(40, len(payload), 97)) + [len(payload) - 1]:
        with pytest.raises(ContainerError):
            decode_block(payload[:n], layout_of(tensors), bits)
    with pytest.raises(ContainerError, match="corrupt|trailing"):
        decode_block(payload + b"\0", layout_of(tensors), bits)


def test_flipped_bits_are_rejected(coded):
    tensors, bits, payload = coded
    rng = np.random.default_rng(1)
    for pos in rng.integers(0, len(payload) * 8, 200):
        bad = bytearray(payload)
        bad[pos // 8] ^= 1 << (pos % 8)
        with pytest.raises(ContainerError):
            decode_block(bytes(bad), layout_of(tensors), bits)


def test_adversarial_payloads_with_a_valid_checksum_never_crash(coded):
    """Corruption behind a recomputed checksum: a ContainerError, or arrays of the layout — nothing else."""
    tensors, bits, payload = coded
    rng = np.random.default_rng(2)
    layout = layout_of(tensors)
    for trial in range(300):
        bad = bytearray(payload)
        for pos in rng.integers(4, len(bad), 1 + trial % 8):
            bad[pos] = rng.integers(0, 256) if trial % 3 else 255
        if trial % 5 == 0:
            bad = bad[: rng.integers(4, len(bad))] + bytes(rng.integers(0, 256, rng.integers(0, 64)).astype(np.uint8))
        bad[:4] = struct.pack("<I", zlib.crc32(bytes(bad[4:])))
        try:
            back = decode_block(bytes(bad), layout, bits)
        except ContainerError:
            continue
        assert [(n, a.dtype, a.shape) for n, a in back] == layout


def test_garbage_and_mismatched_layouts_are_rejected(coded):
    tensors, bits, payload = coded
    layout = layout_of(tensors)
    rng = np.random.default_rng(3)
    for n in (0, 3, 17, 64, 1000):
        with pytest.raises(ContainerError):
            decode_block(bytes(rng.integers(0, 256, n).astype(np.uint8)), layout, bits)
    with pytest.raises(ContainerError):
        decode_block(payload, layout[:-1], bits)
    other = [(n, dt, (s[0], s[1] + 1) + s[2:]) if n == "0.v_codes" else (n, dt, s) for n, dt, s in layout]
    with pytest.raises(ContainerError):
        decode_block(payload, other, bits)
    with pytest.raises(ContainerError, match="bit width"):
        decode_block(payload, layout, {k: v for k, v in bits.items() if k != "0.k_codes"})
    with pytest.raises(ContainerError, match="bit width"):
        encode_block(tensors, {**bits, "0.k_codes": 9})
    with pytest.raises(ContainerError):
        decode_block("not bytes", layout, bits)
    with pytest.raises(ContainerError):
        decode_block(payload, [("x", np.dtype(np.complex64), (2,))], bits)
