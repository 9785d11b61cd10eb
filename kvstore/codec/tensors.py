"""Tensor bundle: an ordered list of named numpy arrays as bytes, with no pickle.

    u32 count, then per tensor:
        u16 name length, name (UTF-8), u8 dtype code, u8 ndim, ndim x u64 dims, raw little-endian data

Invariant: `decode_tensors(encode_tensors(t))` returns arrays equal bit for bit, with the same names,
order, dtypes and shapes; decoded arrays are writable, C-contiguous copies. Any inconsistency raises
`ContainerError`.
"""

from __future__ import annotations

import math
import struct

import numpy as np

from kvstore.codec.container import ContainerError

_DTYPES = [np.uint8, np.int8, np.uint16, np.int16, np.uint32, np.int32, np.int64, np.float16, np.float32, np.float64]
_CODE = {np.dtype(d).newbyteorder("<"): i for i, d in enumerate(_DTYPES)}
_MAX_NDIM = 8


def encode_tensors(tensors: list[tuple[str, np.ndarray]]) -> bytes:
    parts = [struct.pack("<I", len(tensors))]
    seen = set()
    for name, a in tensors:
        if name in seen:
            raise ValueError(f"duplicate tensor name {name!r}")
        seen.add(name)
        a = np.ascontiguousarray(a)
        dt = a.dtype.newbyteorder("<")
        if dt not in _CODE:
            raise ValueError(f"tensor {name!r}: unsupported dtype {a.dtype}")
        if a.ndim > _MAX_NDIM:
            raise ValueError(f"tensor {name!r}: {a.ndim} dims > {_MAX_NDIM}")
        nb = name.encode("utf-8")
        parts.append(struct.pack("<H", len(nb)) + nb + struct.pack("<BB", _CODE[dt], a.ndim))
        parts.append(struct.pack(f"<{a.ndim}Q", *a.shape))
        parts.append(a.astype(dt, copy=False).tobytes())
    return b"".join(parts)


def decode_tensors(data: bytes) -> list[tuple[str, np.ndarray]]:
    mv = memoryview(data)
    pos = 0

    def take(n: int) -> memoryview:
        nonlocal pos
        if n < 0 or pos + n > len(mv):
            raise ContainerError(f"tensor bundle truncated at byte {pos} (needs {n} more)")
        out = mv[pos:pos + n]
        pos += n
        return out

    (count,) = struct.unpack("<I", take(4))
    out: list[tuple[str, np.ndarray]] = []
    for _ in range(count):
        (name_len,) = struct.unpack("<H", take(2))
        try:
            name = bytes(take(name_len)).decode("utf-8")
        except UnicodeDecodeError:
            raise ContainerError("tensor name is not UTF-8") from None
        code, ndim = struct.unpack("<BB", take(2))
        if code >= len(_DTYPES) or ndim > _MAX_NDIM:
            raise ContainerError(f"tensor {name!r}: bad dtype code {code} or ndim {ndim}")
        shape = struct.unpack(f"<{ndim}Q", take(8 * ndim))
        dtype = np.dtype(_DTYPES[code]).newbyteorder("<")
        n = math.prod(shape) * dtype.itemsize  # Python ints: no overflow on hostile shapes
        arr = np.frombuffer(take(n), dtype=dtype).reshape(shape).astype(dtype.newbyteorder("="), copy=True)
        out.append((name, arr))
    if pos != len(mv):
        raise ContainerError(f"tensor bundle has {len(mv) - pos} trailing bytes")
    return out
