"""Group-wise asymmetric integer quantization (pure functions, gpt-fast style).

`quantize(x, bits, group_size, dim)` returns `(codes, scale, zero)`:
- `codes`: uint8, same shape as `x`, each < 2**bits;
- `scale`, `zero`: float16, shape of `x` with `dim` shrunk to `x.shape[dim] // group_size`.

`dequantize(codes, scale, zero, group_size, dim)` gives `codes * scale + zero`.

Error bound (the invariant the tests check): for finite `x` within the fp16 range,
    |x - dequantize(quantize(x))| <= scale / 2 + |x| * 2**-10 + 1e-7   (element-wise, its group's scale)
The fp16 zero is rounded *down* and the fp16 scale *up*, so every code lands in [0, 2**bits - 1]
without clipping; the remaining slack covers fp16/fp32 rounding of `codes * scale + zero`.

`quantize(..., clip=True)` (the spec knob `clip`) picks each group's range instead of taking min-max: of
the candidate ranges `CLIP_RATIOS` (the min-max range shrunk symmetrically about its midpoint, 1.0 first),
the one whose dequantized group has the least squared error; elements beyond it take the nearest end code.
At 2-3 bits this is where most of the error goes: a Gaussian group of 64-128 elements spans about 5 sigma,
while the MSE-optimal 2-bit grid spans about 3. Invariants:
- the group's squared error is at most min-max's (ratio 1.0 is a candidate, computed the same way, and
  ties keep the larger range), summed in float64 so that the choice is a function of the group alone;
- element-wise |x - x_hat| <= scale / 2 + (1 - r) * (max - min) / 2 + |x| * 2**-10 + 1e-7, r the group's
  chosen ratio (>= CLIP_RATIOS[-1]); `dequantize` is unchanged.
"""

from __future__ import annotations

import torch

FP16_MAX = 65504.0
CLIP_RATIOS = tuple(1.0 - 0.05 * i for i in range(13))  # 1.0, 0.95, ..., 0.4 of the min-max range


def _grouped(x: torch.Tensor, group_size: int, dim: int) -> torch.Tensor:
    """[..., n, ...] (n at `dim`) -> [..., n/g, g] with the group axis last (float32)."""
    xt = x.movedim(dim, -1)
    n = xt.shape[-1]
    if n % group_size:
        raise ValueError(f"dim {dim} has size {n}, not a multiple of group_size={group_size}")
    return xt.reshape(*xt.shape[:-1], n // group_size, group_size).float()


def _grid(lo: torch.Tensor, hi: torch.Tensor, levels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """fp16 (scale, zero) of a grid from `lo` to `hi`: zero rounded down, scale up, so [lo, hi] is covered."""
    zero = lo.half()
    zero = torch.where(zero.float() > lo, torch.nextafter(zero, zero.new_tensor(-float("inf"))), zero)
    scale = ((hi - zero.float()) / levels).half()
    short = zero.float() + scale.float() * levels < hi
    scale = torch.where(short, torch.nextafter(scale, scale.new_tensor(float("inf"))), scale)
    return scale, zero


def _codes(g: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, levels: int) -> torch.Tensor:
    """Float codes of the grouped `g` [..., G] on the grid (scale, zero) [...], clamped to [0, levels]."""
    s = scale.float().unsqueeze(-1)
    safe = torch.where(s > 0, s, torch.ones_like(s))
    codes = torch.round((g - zero.float().unsqueeze(-1)) / safe).clamp_(0, levels)
    return torch.where(s > 0, codes, torch.zeros_like(codes))


def _sq_err(g: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, levels: int) -> torch.Tensor:
    """Per group: the float64 sum of squared errors of `g` [..., G] quantized on the grid (scale, zero)."""
    xh = _codes(g, scale, zero, levels) * scale.float().unsqueeze(-1) + zero.float().unsqueeze(-1)
    return (xh - g).double().square().sum(-1)


def _clipped_grid(g: torch.Tensor, mn: torch.Tensor, mx: torch.Tensor, levels: int):
    """The (scale, zero) of the candidate range with the least squared error per group (module docstring)."""
    mid, half = (mn + mx) / 2, (mx - mn) / 2
    best_scale, best_zero = _grid(mn, mx, levels)  # CLIP_RATIOS[0] == 1.0: min-max
    best_err = _sq_err(g, best_scale, best_zero, levels)
    for ratio in CLIP_RATIOS[1:]:
        scale, zero = _grid(torch.maximum(mid - half * ratio, mn), torch.minimum(mid + half * ratio, mx), levels)
        err = _sq_err(g, scale, zero, levels)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_scale = torch.where(better, scale, best_scale)
        best_zero = torch.where(better, zero, best_zero)
    return best_scale, best_zero


def quantize(
    x: torch.Tensor, bits: int, group_size: int, dim: int, clip: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantize `x` in groups of `group_size` consecutive elements along `dim` (min-max, or `clip`ped)."""
    if not 1 <= bits <= 8:
        raise ValueError(f"bits={bits} must be in [1, 8]")
    dim = dim % x.dim()
    g = _grouped(x, group_size, dim)  # [..., n/g, g]
    levels = (1 << bits) - 1
    mn = g.amin(-1).clamp(-FP16_MAX, FP16_MAX)  # [..., n/g]
    mx = g.amax(-1).clamp(-FP16_MAX, FP16_MAX)
    # clip's error sums run over contiguous groups (the min-max path needs no copy)
    scale, zero = _clipped_grid(g.contiguous(), mn, mx, levels) if clip else _grid(mn, mx, levels)
    codes = _codes(g, scale, zero, levels).to(torch.uint8)
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
