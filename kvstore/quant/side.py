"""Sealing one side (keys or values) of whole token blocks, and reading it back: pure functions.

`seal(x, plan)` turns x [B, H, m, D] (m a multiple of `plan.block`) into named tensors:
    "codes" [B, H, m, packed(D)] uint8, "scale"/"zero" fp16 (group axis shrunk, as `quantize` returns),
    and with outliers "oidx"/"oval" [m / block, k]; or just "fp" [B, H, m, D] for 16 bits.
`read(tensors, plan, head_dim)` returns [B, H, m, D] float32 in the original basis, or in the rotated
basis with `rotated_out=True`. Every tensor grows along dim -2 as blocks are appended, so a side's
state is the concatenation of its blocks' states.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvstore.quant import outliers as out
from kvstore.quant.pack import pack, unpack
from kvstore.quant.quantize import dequantize, quantize
from kvstore.quant.rotation import hadamard


@dataclass(frozen=True)
class SidePlan:
    bits: int  # 2, 3, 4, 8, or 16 (kept as is)
    group: int  # quantization group size along `dim`
    dim: int  # -2: grouped along tokens (keys, per channel); -1: along head_dim (values, per token)
    block: int  # tokens per sealed block (the key group)
    rotate: bool = False  # Hadamard-rotate head_dim before quantizing
    outliers: float = 0.0  # fraction of each block kept exactly
    clip: bool = False  # least-squared-error group ranges instead of min-max (`quantize`'s clip)


def seal(x: torch.Tensor, plan: SidePlan) -> dict[str, torch.Tensor]:
    if plan.bits == 16:
        return {"fp": x.contiguous()}
    if plan.rotate:
        x = hadamard(x.float())
    res: dict[str, torch.Tensor] = {}
    if plan.outliers > 0:
        x, res["oidx"], res["oval"] = out.split(x, plan.outliers, plan.group, plan.dim, plan.block)
    codes, res["scale"], res["zero"] = quantize(x, plan.bits, plan.group, plan.dim, clip=plan.clip)
    res["codes"] = pack(codes, plan.bits)
    return res


def read(t: dict[str, torch.Tensor], plan: SidePlan, head_dim: int, rotated_out: bool = False) -> torch.Tensor:
    if "fp" in t:
        return t["fp"].float()
    x = dequantize(unpack(t["codes"], plan.bits, head_dim), t["scale"], t["zero"], plan.group, plan.dim)
    if "oidx" in t:
        x = out.restore(x, t["oidx"], t["oval"], plan.block)
    return hadamard(x) if plan.rotate and not rotated_out else x  # the rotation is its own inverse
