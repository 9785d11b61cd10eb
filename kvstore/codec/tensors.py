"""Tensor bundle: an ordered list of named numpy arrays as plain little-endian bytes (never pickle).

Format (integers little-endian):

    u32 count
    count times:
        u16 name length, name (utf-8)
        u8  dtype code (DTYPE_CODES)
        u8  ndim, then ndim x u64 dims
        raw array bytes, little-endian, C order (prod(dims) * itemsize bytes)

Invariants:
- `decode_tensors(encode_tensors(t))` equals `t` bit for bit: same names in the same order, same dtypes
  (in native little-endian form), same shapes, same bytes. bfloat16 travels as `uint16` bit patterns.
- Names are unique. Decoded arrays are fresh copies: writable, C-contiguous, owning their memory.
- Every size is validated on decode; bad dtype codes, overruns and trailing bytes raise ContainerError.
"""

from __future__ import annotations

import functools
import struct

import numpy as np

from kvstore.codec.container import ContainerError

# Stable on-disk codes: never renumber, only append.
DTYPE_CODES: dict[str, int] = {
    "bool": 1, "uint8": 2, "int8": 3, "uint16": 4, "int16": 5, "uint32": 6, "int32": 7,
    "uint64": 8, "int64": 9, "float16": 10, "float32": 11, "float64": 12,
}
_CODE_DTYPES = {code: np.dtype(name).newbyteorder("<") for name, code in DTYPE_CODES.items()}
MAX_NDIM = 32
_U32 = struct.Struct("<I")
_U16 = struct.Struct("<H")
_BB = struct.Struct("<BB")
_DIMS = [struct.Struct(f"<{n}Q") for n in range(MAX_NDIM + 1)]


def _le_bytes(a: np.ndarray) -> memoryview | bytes:
    """The array's raw bytes, little-endian, C order (no copy when already so)."""
    le = np.ascontiguousarray(a, dtype=a.dtype.newbyteorder("<"))
    if le.size == 0:
        return b""
    return memoryview(le.reshape(-1)).cast("B")


def encode_tensors(tensors: list[tuple[str, np.ndarray]]) -> bytes:
    """Serialize named arrays in order. Raises ContainerError for unsupported dtypes, bad or duplicate names."""
    parts: list = [_U32.pack(len(tensors))]
    seen: set[str] = set()
    for item in tensors:
        try:
            name, arr = item
        except (TypeError, ValueError):
            raise ContainerError("each tensor must be a (name, array) pair") from None
        if not isinstance(name, str):
            raise ContainerError(f"tensor name must be a str, not {type(name).__name__}")
        if name in seen:
            raise ContainerError(f"duplicate tensor name {name!r}")
        seen.add(name)
        if not isinstance(arr, np.ndarray):
            raise ContainerError(f"tensor {name!r} is a {type(arr).__name__}, not a numpy array")
        code = DTYPE_CODES.get(dtype_name(arr.dtype)) if arr.dtype.kind in "biuf" else None
        if code is None:
            raise ContainerError(f"tensor {name!r} has unsupported dtype {arr.dtype} (supported: {', '.join(DTYPE_CODES)})")
        if arr.ndim > MAX_NDIM:
            raise ContainerError(f"tensor {name!r} has {arr.ndim} dims, more than {MAX_NDIM}")
        name_b = name.encode("utf-8")
        if len(name_b) > 0xFFFF:
            raise ContainerError(f"tensor name is too long ({len(name_b)} bytes)")
        parts.append(_U16.pack(len(name_b)))
        parts.append(name_b)
        parts.append(struct.pack(f"<BB{arr.ndim}Q", code, arr.ndim, *arr.shape))
        parts.append(_le_bytes(arr))
    return b"".join(parts)


class _Reader:
    def __init__(self, data: bytes):
        self.view = memoryview(data)
        self.pos = 0

    def take(self, n: int, what: str, *args) -> memoryview:  # what.format(*args) names the field in errors
        if n > len(self.view) - self.pos:
            raise ContainerError(f"truncated tensor bundle: {what.format(*args)} needs {n} bytes at offset "
                                 f"{self.pos}, only {len(self.view) - self.pos} left")
        out = self.view[self.pos:self.pos + n]
        self.pos += n
        return out

    def unpack(self, st: struct.Struct, what: str, *args) -> tuple:
        return st.unpack(self.take(st.size, what, *args))


@functools.lru_cache(maxsize=64)
def dtype_name(dtype: np.dtype) -> str:
    """dtype.name, cached (numpy computes it in Python, ~5 us; bundles have hundreds of tensors)."""
    return dtype.name


def decode_tensors(data: bytes, *, copy: bool = True) -> list[tuple[str, np.ndarray]]:
    """Inverse of `encode_tensors`; validates every field and raises ContainerError on any problem.
    `copy=False`: little-endian arrays come back as read-only views of `data` (for a caller that copies)."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise ContainerError(f"tensor bundle must be bytes, not {type(data).__name__}")
    r = _Reader(data)
    (count,) = r.unpack(_U32, "tensor count")
    # Every tensor takes at least 4 bytes (name length, dtype, ndim): refuse absurd counts up front.
    if count * 4 > len(r.view) - r.pos:
        raise ContainerError(f"truncated tensor bundle: {count} tensors announced in {len(r.view)} bytes")
    out: list[tuple[str, np.ndarray]] = []
    seen: set[str] = set()
    for i in range(count):
        (name_len,) = r.unpack(_U16, "name length of tensor {}", i)
        try:
            name = bytes(r.take(name_len, "name of tensor {}", i)).decode("utf-8")
        except UnicodeDecodeError:
            raise ContainerError(f"name of tensor {i} is not valid utf-8") from None
        if name in seen:
            raise ContainerError(f"duplicate tensor name {name!r}")
        seen.add(name)
        code, ndim = r.unpack(_BB, "dtype and ndim of tensor {!r}", name)
        dtype = _CODE_DTYPES.get(code)
        if dtype is None:
            raise ContainerError(f"tensor {name!r} has unknown dtype code {code}")
        if ndim > MAX_NDIM:
            raise ContainerError(f"tensor {name!r} has {ndim} dims, more than {MAX_NDIM}")
        shape = _DIMS[ndim].unpack(r.take(8 * ndim, "dims of tensor {!r}", name))
        nbytes = dtype.itemsize
        for d in shape:
            nbytes *= d
        raw = r.take(nbytes, "data of tensor {!r} (shape {}, {})", name, list(shape), dtype)
        try:
            arr = np.frombuffer(raw, dtype=dtype).astype(dtype.newbyteorder("="), copy=copy).reshape(shape)
        except ValueError as e:
            raise ContainerError(f"tensor {name!r} has an invalid shape {list(shape)}: {e}") from None
        out.append((name, arr))
    if r.pos != len(r.view):
        raise ContainerError(f"{len(r.view) - r.pos} unexpected trailing bytes after the tensor bundle")
    return out
