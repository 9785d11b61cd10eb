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

import numpy as np
import torch

from kvstore.config import QuantConfig
from kvstore.quant.pack import pack, unpack


@dataclass(frozen=True)
class StreamContext:
    quant: QuantConfig
    head_dims: dict[int, int]  # layer -> head_dim (the last dim of its key scales, present with key codes)

    @classmethod
    def of(cls, quant_spec: str, shapes: dict[str, tuple[int, ...]]) -> "StreamContext":
        dims = {int(n.split(".")[0]): int(s[-1]) for n, s in shapes.items() if n.endswith(".k_scale")}
        return cls(QuantConfig.parse(quant_spec), dims)

    def key_bits(self, name: str) -> int:
        return self.quant.bits_for(int(name.split(".")[0]))[0]


def _planes(a: np.ndarray) -> np.ndarray:
    a = np.ascontiguousarray(a, dtype=a.dtype.newbyteorder("<"))  # little-endian bytes, as on the wire
    b = a.view(np.uint8).reshape(-1, a.dtype.itemsize)
    return np.ascontiguousarray(b.T).reshape(-1)


def _unplanes(data: np.ndarray, dtype: np.dtype, shape) -> np.ndarray:
    b = data.reshape(dtype.itemsize, -1).T
    return np.ascontiguousarray(b).view(np.dtype(dtype).newbyteorder("<")).reshape(shape).astype(dtype, copy=False)


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
        codes = unpack(torch.from_numpy(arr), bits, d)  # [B, H, T, D]
        return pack(codes.transpose(-1, -2).contiguous(), bits).numpy().reshape(-1)  # [B, H, D, packed(T)]
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
        packed = torch.from_numpy(data.copy()).reshape(b, h, d, -1)
        codes = unpack(packed, bits, t).transpose(-1, -2).contiguous()  # [B, H, T, D]
        out = pack(codes, bits).numpy()
    elif kind == "transposed_planes":
        s = list(shape)
        s[-1], s[-2] = s[-2], s[-1]
        out = np.swapaxes(_unplanes(data, dtype, s), -1, -2)
    elif kind == "planes":
        out = _unplanes(data, dtype, shape)
    else:
        out = data.view(np.dtype(dtype).newbyteorder("<")).reshape(shape)
    out = np.array(out, copy=True, order="C")  # owning, writable, C order (0-d stays 0-d)
    if out.shape != tuple(shape) or out.dtype != dtype:
        raise ValueError(f"stream {name!r} decodes to {out.dtype}{out.shape}, expected {dtype}{tuple(shape)}")
    return out
