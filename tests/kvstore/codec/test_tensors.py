import struct

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from kvstore.codec.container import ContainerError
from kvstore.codec.tensors import decode_tensors, encode_tensors

DTYPES = [np.uint8, np.int8, np.uint16, np.int16, np.uint32, np.int32, np.int64, np.float16, np.float32, np.float64]


def test_roundtrip_every_dtype_bit_exact():
    rng = np.random.default_rng(0)
    tensors = []
    for i, dt in enumerate(DTYPES):
        a = (rng.standard_normal((3, 4, 5)) * 100).astype(dt)
        tensors.append((f"t{i}", a))
    tensors.append(("empty", np.zeros((2, 0, 3), dtype=np.float32)))
    tensors.append(("nan", np.array([np.nan, -0.0, np.inf], dtype=np.float32)))
    out = decode_tensors(encode_tensors(tensors))
    assert [n for n, _ in out] == [n for n, _ in tensors]
    for (_, a), (_, b) in zip(tensors, out):
        assert a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()
        assert b.flags.writeable and b.flags.c_contiguous


def test_non_contiguous_input():
    a = np.arange(24, dtype=np.int32).reshape(4, 6)[:, ::2]
    (_, b), = decode_tensors(encode_tensors([("x", a)]))
    assert np.array_equal(a, b)


def test_rejects_bad_input():
    with pytest.raises(ValueError, match="duplicate"):
        encode_tensors([("a", np.zeros(1)), ("a", np.zeros(1))])
    with pytest.raises(ValueError, match="unsupported dtype"):
        encode_tensors([("a", np.zeros(1, dtype=np.complex64))])
    blob = encode_tensors([("a", np.arange(10, dtype=np.float32))])
    with pytest.raises(ContainerError, match="truncated"):
        decode_tensors(blob[:-1])
    with pytest.raises(ContainerError, match="trailing"):
        decode_tensors(blob + b"\x00")
    huge = bytearray(blob)
    dims_at = 4 + 2 + 1 + 2  # count, name len, name "a", code+ndim
    huge[dims_at:dims_at + 8] = (2**62).to_bytes(8, "little")
    with pytest.raises(ContainerError, match="truncated"):
        decode_tensors(bytes(huge))


# ---- more dtypes, shapes and hostile bundles ---------------------------------------------------------


ALL = DTYPES + [np.uint64, np.bool_]


@settings(max_examples=60, deadline=None)
@given(st.lists(hnp.arrays(st.sampled_from(ALL), hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=5)),
                max_size=5))
def test_roundtrip_property(arrays):
    tensors = [(f"n{i}-ü", a) for i, a in enumerate(arrays)]
    out = decode_tensors(encode_tensors(tensors))
    assert [n for n, _ in out] == [n for n, _ in tensors]
    for (_, a), (_, b) in zip(tensors, out):
        assert a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()
        assert b.flags.writeable and b.flags.c_contiguous


def test_empty_bundle_and_big_endian_input():
    assert decode_tensors(encode_tensors([])) == []
    be = np.arange(6, dtype=">f4").reshape(2, 3)
    (_, b), = decode_tensors(encode_tensors([("be", be)]))
    assert b.dtype == np.float32 and np.array_equal(b, be)


def test_decoded_arrays_are_independent_copies():
    a = np.arange(8, dtype=np.uint16)  # how bfloat16 bits travel
    blob = encode_tensors([("bf16", a)])
    (_, b), = decode_tensors(blob)
    b[0] = 999  # writable, and not a view of the input buffer
    assert decode_tensors(blob)[0][1][0] == 0 and blob == encode_tensors([("bf16", a)])


def _bundle(*entries: bytes, count: int | None = None) -> bytes:
    return struct.pack("<I", len(entries) if count is None else count) + b"".join(entries)


def _entry(name: bytes, code: int, dims: tuple, data: bytes) -> bytes:
    return struct.pack("<H", len(name)) + name + struct.pack(f"<BB{len(dims)}Q", code, len(dims), *dims) + data


@pytest.mark.parametrize("blob,needle", [
    (_bundle(_entry(b"a", 200, (1,), b"x")), "unknown dtype code 200"),
    (_bundle(_entry(b"a", 2, (1,), b"x"), _entry(b"a", 2, (1,), b"y")), "duplicate tensor name"),
    (_bundle(_entry(b"\xff", 2, (1,), b"x")), "not valid utf-8"),
    (_bundle(_entry(b"a", 2, (1,) * 33, b"x")), "more than 32"),
    (_bundle(count=1000), "truncated"),
    (b"\x01\x00", "truncated"),
    (_bundle(_entry(b"a", 2, (0, 2**63), b"")), "invalid shape"),
])
def test_hostile_bundles_are_rejected(blob, needle):
    with pytest.raises(ContainerError, match=needle):
        decode_tensors(blob)


def test_encode_rejects_non_arrays_and_bad_names():
    with pytest.raises(ContainerError, match="not a numpy array"):
        encode_tensors([("a", [1, 2])])  # type: ignore[list-item]
    with pytest.raises(ContainerError, match="name must be a str"):
        encode_tensors([(1, np.zeros(1))])  # type: ignore[list-item]
