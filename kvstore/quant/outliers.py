"""Dense-and-sparse outliers (QAQ style), pure functions.

A sealed block of `block` tokens ([B, H, block, D]) keeps its `k = ceil(fraction * numel)` most
outlying elements exactly (fp16) in a sparse side table; the rest is group-quantized as usual. An
element's outlyingness is its distance from its quantization group's mean in units of the group's
standard deviation, so the table goes where it narrows a group's range most. Outliers are replaced by
their group's inlier midpoint before quantizing, so they no longer stretch the group's scale.

Shapes: x [B, H, m, D] with m = nb * block -> idx [nb, k] (int16 when the block has at most 32767
elements, else int32; flat index into the block's [B, H, block, D]), val [nb, k] fp16.

Invariant: `restore(dequantize(quantize(filled)), idx, val)` equals x at the outlier positions up to fp16
rounding, and elsewhere obeys the quantizer's bound with the inliers' (smaller) scale.
"""

from __future__ import annotations

import math

import torch


def _blocks(x: torch.Tensor, block: int) -> torch.Tensor:
    """[B, H, m, D] -> [nb, B*H*block*D] (a copy, block-major)."""
    b, h, m, d = x.shape
    return x.reshape(b, h, m // block, block, d).permute(2, 0, 1, 3, 4).reshape(m // block, -1)


def _unblocks(xb: torch.Tensor, shape: torch.Size, block: int) -> torch.Tensor:
    b, h, m, d = shape
    return xb.reshape(m // block, b, h, block, d).permute(1, 2, 0, 3, 4).reshape(b, h, m, d)


def _group_view(x: torch.Tensor, group: int, dim: int) -> torch.Tensor:
    xt = x.movedim(dim, -1)
    return xt.reshape(*xt.shape[:-1], xt.shape[-1] // group, group)


def _ungroup(g: torch.Tensor, dim: int, shape: torch.Size) -> torch.Tensor:
    moved = list(shape)
    moved.append(moved.pop(dim % len(shape)))
    return g.reshape(moved).movedim(-1, dim)


def count(fraction: float, block_numel: int) -> int:
    return min(block_numel, math.ceil(fraction * block_numel)) if fraction > 0 else 0


def index_dtype(block_numel: int) -> torch.dtype:
    return torch.int16 if block_numel <= 32767 else torch.int32


def split(x: torch.Tensor, fraction: float, group: int, dim: int, block: int):
    """-> (filled [B, H, m, D] float32, idx [nb, k], val [nb, k] fp16); see the module docstring."""
    xf = x.float()
    g = _group_view(xf, group, dim)
    z = (g - g.mean(-1, keepdim=True)).abs() / (g.std(-1, unbiased=False, keepdim=True) + 1e-6)
    zb = _blocks(_ungroup(z, dim, xf.shape), block)  # [nb, N]
    k = count(fraction, zb.shape[1])
    idx = zb.topk(k, dim=1).indices.sort(dim=1).values  # [nb, k]
    val = _blocks(xf, block).gather(1, idx).half()
    mask = _unblocks(torch.zeros_like(zb, dtype=torch.bool).scatter_(1, idx, True), xf.shape, block)
    gm = _group_view(mask, group, dim)
    lo = torch.where(gm, torch.full_like(g, float("inf")), g).amin(-1, keepdim=True)
    hi = torch.where(gm, torch.full_like(g, -float("inf")), g).amax(-1, keepdim=True)
    mid = torch.where(torch.isfinite(lo) & torch.isfinite(hi), (lo + hi) / 2, torch.zeros_like(lo))
    filled = _ungroup(torch.where(gm, mid, g), dim, xf.shape)
    return filled, idx.to(index_dtype(zb.shape[1])), val


def restore(x: torch.Tensor, idx: torch.Tensor, val: torch.Tensor, block: int) -> torch.Tensor:
    """Put the side table's values back into dequantized x [B, H, m, D] (float32)."""
    xb = _blocks(x, block)
    xb.scatter_(1, idx.long(), val.to(xb.dtype))
    return _unblocks(xb, x.shape, block)
