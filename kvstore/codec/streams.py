"""Reversible (lossless) stream transforms that put a KV state's bytes in an order entropy coders like.

Applied to each tensor of a `KVState` before zstd, by name:
- `<l>.k_codes` (keys, bit-packed along head_dim, [B, H, T, packed(D)]): unpacked and re-packed along the
  token axis, channel-major [B, H, D, packed(T)], so a channel's codes over time sit together (keys are
  quantized per channel: neighbours in time share a group and a distribution);
- `<l>.k_scale` / `<l>.k_zero` ([B, H, T/g, D] fp16): transposed to channel-major, then byte planes;
- every other multi-byte tensor (value scales and zeros, sinks, windows, fp sides, outlier tables): byte
  planes, i.e. all first bytes, then all second bytes ..., which separates smooth exponent bytes from
  noisy mantissa bytes;
- byte tensors (value codes): unchanged.

`forward(name, arr, ctx)` returns a 1-D uint8 array; `inverse(name, data, dtype, shape, ctx)` gives back
the original array bit for bit. `ctx` is a `StreamContext` (bits per layer and head_dim), derived from the
state's quant spec and shapes on both sides, so nothing extra is stored.
"""

from __future__ import annotations

from dataclasses import dataclass

import numba as nb
import numpy as np
import torch

from kvstore.config import QuantConfig
from kvstore.quant.pack import pack, packed_size, unpack


@dataclass(frozen=True)
class StreamContext:
    quant: QuantConfig
    head_dims: dict[int, int]  # layer -> head_dim (the last dim of its key scales, present with key codes)

    @classmethod
    def of(cls, quant_spec: str, shapes: dict[str, tuple[int, ...]]) -> StreamContext:
        dims = {int(n.split(".")[0]): int(s[-1]) for n, s in shapes.items() if n.endswith(".k_scale")}
        return cls(QuantConfig.parse(quant_spec), dims)

    def key_bits(self, name: str) -> int:
        return self.quant.bits_for(int(name.split(".")[0]))[0]


_UINT = {2: np.uint16, 4: np.uint32, 8: np.uint64}


@nb.njit(cache=True, nogil=True)
def _split(v, out):  # unsigned words v [N] -> out [isz * N]: plane b = byte b (little-endian) of every word
    n = v.size
    for b in range(out.size // max(1, n)):
        sh = np.uint64(8 * b)
        for i in range(n):
            out[b * n + i] = np.uint8((np.uint64(v[i]) >> sh) & np.uint64(255))


@nb.njit(cache=True, nogil=True)
def _join(p, out):  # inverse of _split: out [N] unsigned words from the byte planes p [isz * N]
    n = out.size
    isz = p.size // max(1, n)
    if isz == 2:
        for i in range(n):
            out[i] = np.uint16(p[i]) | (np.uint16(p[n + i]) << np.uint16(8))
    elif isz == 4:
        for i in range(n):
            out[i] = (np.uint32(p[i]) | (np.uint32(p[n + i]) << np.uint32(8))
                      | (np.uint32(p[2 * n + i]) << np.uint32(16)) | (np.uint32(p[3 * n + i]) << np.uint32(24)))
    else:
        for i in range(n):
            w = np.uint64(0)
            for b in range(isz):
                w |= np.uint64(p[b * n + i]) << np.uint64(8 * b)
            out[i] = w


@nb.njit(cache=True, nogil=True)
def _swap4(src, n_a, n_b, out):  # 4-bit codes src [R, n_a, packed(n_b)] -> out [R, n_b, packed(n_a)], zeroed
    for r in range(src.shape[0]):
        for a in range(n_a):
            sh = (a & 1) * 4
            for b in range(n_b):
                out[r, b, a >> 1] |= ((src[r, a, b >> 1] >> ((b & 1) * 4)) & 15) << sh


def _swap_codes(packed: np.ndarray, bits: int, n_a: int, n_b: int) -> np.ndarray:
    """Packed codes [*lead, n_a, packed(n_b)] -> [*lead, n_b, packed(n_a)]: the two code axes swapped."""
    lead = packed.shape[:-2]
    if bits == 4:
        src = np.ascontiguousarray(packed).reshape(-1, n_a, packed.shape[-1])
        out = np.zeros((src.shape[0], n_b, packed_size(n_a, 4)), np.uint8)
        _swap4(src, n_a, n_b, out)
        return out.reshape(*lead, n_b, -1)
    codes = unpack(torch.from_numpy(np.array(packed, copy=True)), bits, n_b)  # [*lead, n_a, n_b]
    return pack(codes.transpose(-1, -2).contiguous(), bits).numpy()


def _planes(a: np.ndarray) -> np.ndarray:
    """Multi-byte array -> its byte planes (all first little-endian bytes, then all second ...), uint8 [size*isz]."""
    if a.dtype.itemsize not in _UINT:
        a = np.ascontiguousarray(a, dtype=a.dtype.newbyteorder("<"))  # little-endian bytes, as on the wire
        return np.ascontiguousarray(a.view(np.uint8).reshape(-1, a.dtype.itemsize).T).reshape(-1)
    v = np.ascontiguousarray(a, dtype=a.dtype.newbyteorder("=")).reshape(-1).view(_UINT[a.dtype.itemsize])
    out = np.empty(v.size * a.dtype.itemsize, np.uint8)
    _split(v, out)  # the words' values, so the planes are little-endian on any machine
    return out


def _unplanes(data: np.ndarray, dtype: np.dtype, shape) -> np.ndarray:
    """Inverse of _planes: a fresh, writable, C-contiguous array of `dtype` and `shape`."""
    dtype = np.dtype(dtype)
    if dtype.itemsize not in _UINT:
        b = data.reshape(dtype.itemsize, -1).T
        return np.ascontiguousarray(b).view(dtype.newbyteorder("<")).reshape(shape).astype(dtype)
    out = np.empty(data.size // dtype.itemsize, _UINT[dtype.itemsize])
    _join(np.ascontiguousarray(data, np.uint8).reshape(-1), out)
    return out.view(dtype.newbyteorder("=")).reshape(shape).astype(dtype, copy=False)


def _kind(name: str, dtype: np.dtype, ctx: StreamContext, shape) -> str:
    field = name.split(".", 1)[-1]
    if field == "k_codes":
        bits = ctx.key_bits(name)
        t = shape[-2]
        return "channel_major_codes" if bits < 8 and t > 0 and (t * bits) % 8 == 0 else "plain"  # t=0: a tail's
    if field in ("k_scale", "k_zero"):
        return "transposed_planes"
    if dtype.itemsize > 1:
        return "planes"
    return "plain"


def forward(name: str, arr: np.ndarray, ctx: StreamContext) -> np.ndarray:
    kind = _kind(name, arr.dtype, ctx, arr.shape)
    if kind == "channel_major_codes":
        bits, d = ctx.key_bits(name), ctx.head_dims[int(name.split(".")[0])]
        return _swap_codes(arr, bits, arr.shape[-2], d).reshape(-1)  # [B, H, T, packed(D)] -> [B, H, D, packed(T)]
    if kind == "transposed_planes":
        return _planes(np.swapaxes(arr, -1, -2))
    if kind == "planes":
        return _planes(arr)
    return np.ascontiguousarray(arr, dtype=arr.dtype.newbyteorder("<") if arr.dtype.itemsize > 1 else arr.dtype
                                ).view(np.uint8).reshape(-1)


def inverse(name: str, data: np.ndarray, dtype: np.dtype, shape: tuple[int, ...], ctx: StreamContext) -> np.ndarray:
    kind = _kind(name, dtype, ctx, shape)
    if kind == "channel_major_codes":
        bits, d = ctx.key_bits(name), ctx.head_dims[int(name.split(".")[0])]
        b, h, t = shape[0], shape[1], shape[2]
        out = _swap_codes(data.reshape(b, h, d, -1), bits, d, t)  # [B, H, D, packed(T)] -> [B, H, T, packed(D)]
    elif kind == "transposed_planes":
        s = list(shape)
        s[-1], s[-2] = s[-2], s[-1]
        out = np.swapaxes(_unplanes(data, dtype, s), -1, -2)
    elif kind == "planes":
        out = _unplanes(data, dtype, shape)
    else:
        out = data.view(np.dtype(dtype).newbyteorder("<")).reshape(shape)
    if kind != "planes":  # _unplanes made a fresh array already
        out = np.array(out, copy=True, order="C")  # owning, writable, C order (0-d stays 0-d)
    if out.shape != tuple(shape) or out.dtype != dtype:
        raise ValueError(f"stream {name!r} decodes to {out.dtype}{out.shape}, expected {dtype}{tuple(shape)}")
    return out
