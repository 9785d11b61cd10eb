"""Group-wise asymmetric integer quantization (pure functions, gpt-fast style).

`quantize(x, bits, group_size, dim)` returns `(codes, scale, zero)`:
- `codes`: uint8, same shape as `x`, each < 2**bits;
- `scale`, `zero`: float16, shape of `x` with `dim` shrunk to `x.shape[dim] // group_size`.

`dequantize(codes, scale, zero, group_size, dim)` gives `codes * scale + zero`.

Error bound (the invariant the tests check): for finite `x` within the fp16 range,
    |x - dequantize(quantize(x))| <= scale / 2 + |x| * 2**-10 + 1e-7   (element-wise, its group's scale)
The fp16 zero is rounded *down* and the fp16 scale *up*, so every code lands in [0, 2**bits - 1]
without clipping; the remaining slack covers fp16/fp32 rounding of `codes * scale + zero`.
"""

from __future__ import annotations

import torch

FP16_MAX = 65504.0


def _grouped(x: torch.Tensor, group_size: int, dim: int) -> torch.Tensor:
    """[..., n, ...] (n at `dim`) -> [..., n/g, g] with the group axis last (float32)."""
    xt = x.movedim(dim, -1)
    n = xt.shape[-1]
    if n % group_size:
        raise ValueError(f"dim {dim} has size {n}, not a multiple of group_size={group_size}")
    return xt.reshape(*xt.shape[:-1], n // group_size, group_size).float()


def quantize(
    x: torch.Tensor, bits: int, group_size: int, dim: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantize `x` in groups of `group_size` consecutive elements along `dim`."""
    if not 1 <= bits <= 8:
        raise ValueError(f"bits={bits} must be in [1, 8]")
    dim = dim % x.dim()
    g = _grouped(x, group_size, dim)  # [..., n/g, g]
    levels = (1 << bits) - 1
    mn = g.amin(-1).clamp(-FP16_MAX, FP16_MAX)  # [..., n/g]
    mx = g.amax(-1).clamp(-FP16_MAX, FP16_MAX)
    zero = mn.half()
    zero = torch.where(zero.float() > mn, torch.nextafter(zero, zero.new_tensor(-float("inf"))), zero)
    scale = ((mx - zero.float()) / levels).half()
    short = zero.float() + scale.float() * levels < mx
    scale = torch.where(short, torch.nextafter(scale, scale.new_tensor(float("inf"))), scale)
    s = scale.float().unsqueeze(-1)
    safe = torch.where(s > 0, s, torch.ones_like(s))
    codes = torch.round((g - zero.float().unsqueeze(-1)) / safe).clamp_(0, levels)
    codes = torch.where(s > 0, codes, torch.zeros_like(codes)).to(torch.uint8)
    codes = codes.reshape(*codes.shape[:-2], -1).movedim(-1, dim)
    return codes.contiguous(), scale.movedim(-1, dim).contiguous(), zero.movedim(-1, dim).contiguous()


def dequantize(
    codes: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor,
    group_size: int,
    dim: int,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Inverse map `codes * scale + zero`, broadcasting each group's scale over its `group_size` elements."""
    dim = dim % codes.dim()
    c = codes.movedim(dim, -1)
    c = c.reshape(*c.shape[:-1], -1, group_size).float()  # [..., n/g, g]
    s = scale.movedim(dim, -1).float().unsqueeze(-1)  # [..., n/g, 1]
    z = zero.movedim(dim, -1).float().unsqueeze(-1)
    x = (c * s + z).reshape(*c.shape[:-2], -1).movedim(-1, dim)
    return x.to(dtype)
