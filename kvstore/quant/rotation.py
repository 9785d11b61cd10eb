"""Data-free rotation of head_dim: the normalized Walsh-Hadamard transform (pure functions).

`hadamard(x)` multiplies the last dimension by H / sqrt(d), with H the Sylvester Hadamard matrix; it is
orthonormal and its own inverse (`hadamard(hadamard(x)) == x` up to float rounding), so attention can run
on un-rotated keys and values after `hadamard` is applied again. Spreading each channel's energy over all
channels flattens outliers before group quantization. Requires d to be a power of two.

`hadamard_rows(x)` is the same transform computed by butterflies (additions and subtractions, then one
scaling), elementwise across rows: each row's result is a function of that row alone, whatever the shape
it is computed in (a matrix product's last bits depend on the row count). Attention-time readings of the
window use it, so a token's rotated reading is computed once, when it arrives, and kept.

Shapes: x [..., d] -> [..., d], same dtype (computed in float32).
"""

from __future__ import annotations

import torch

_CACHE: dict[tuple[int, str], torch.Tensor] = {}


def hadamard_matrix(d: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """The normalized d x d Sylvester Hadamard matrix (float32); d must be a power of two."""
    if d < 1 or d & (d - 1):
        raise ValueError(f"Hadamard rotation needs a power-of-two head_dim, got {d}")
    key = (d, str(device))
    if key not in _CACHE:
        h = torch.ones(1, 1)
        while h.shape[0] < d:
            h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
        _CACHE[key] = (h / d**0.5).to(device)
    return _CACHE[key]


def hadamard(x: torch.Tensor) -> torch.Tensor:
    """Rotate the last dimension by the normalized Hadamard matrix (an involution)."""
    h = hadamard_matrix(x.shape[-1], x.device)
    return (x.float() @ h).to(x.dtype)


def hadamard_rows(x: torch.Tensor) -> torch.Tensor:
    """`hadamard(x)` by the fast Walsh-Hadamard transform, row by row bit-identical whatever the shape."""
    d = x.shape[-1]
    if d < 1 or d & (d - 1):
        raise ValueError(f"Hadamard rotation needs a power-of-two head_dim, got {d}")
    y, h = x.float(), 1
    while h < d:  # Sylvester order: pair element i with i + h inside each block of 2h
        y = y.reshape(*x.shape[:-1], d // (2 * h), 2, h)
        a, b = y.select(-2, 0), y.select(-2, 1)
        y = torch.stack((a + b, a - b), dim=-2)
        h *= 2
    return (y.reshape(x.shape) * d ** -0.5).to(x.dtype)
