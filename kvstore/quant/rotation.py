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

import numba as nb
import numpy as np
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
    y = x.to(torch.float32, memory_format=torch.contiguous_format, copy=True)
    _fwht_rows(y.view(-1, d).numpy(), np.float32(d ** -0.5))
    return y.to(x.dtype)


@nb.njit(cache=True, nogil=True)
def _fwht_rows(x: np.ndarray, scale: np.float32) -> None:
    """In place, each row of float32 x [n, d]: butterflies in Sylvester order (element j paired with j + h in
    each block of 2h, h = 1, 2, 4, ...: (a + b, a - b)), then `scale`. Float32 additions, one row at a time:
    a row's result is a function of that row alone."""
    n, d = x.shape
    for r in range(n):
        h = 1
        while h < d:
            for i in range(0, d, 2 * h):
                for j in range(i, i + h):
                    a = x[r, j]
                    b = x[r, j + h]
                    x[r, j] = a + b
                    x[r, j + h] = a - b
            h *= 2
        for j in range(d):
            x[r, j] *= scale
