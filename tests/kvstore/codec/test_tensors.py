import numpy as np
import pytest

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
