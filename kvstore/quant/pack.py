"""Exact bit-packing of small unsigned integer codes into bytes (pure functions).

`pack(codes, bits)` packs along the last dimension: every 8 codes become `bits` bytes, so 3-bit codes
really take 3/8 of a byte each. The last dimension is zero-padded to a multiple of 8.
`unpack(packed, bits, n)` is its exact inverse: `unpack(pack(c, b), b, c.shape[-1]) == c` for every
uint8 tensor `c` whose values are < 2**b.

Shapes: codes `[..., n]` uint8  <->  packed `[..., packed_size(n, bits)]` uint8
(`ceil(n / 8) * bits`, or `n` for 8-bit codes, which need no packing).
"""

from __future__ import annotations

import torch

_SHIFTS_CACHE: dict[tuple[int, str], torch.Tensor] = {}


def _shifts(bits: int, device: torch.device) -> torch.Tensor:
    key = (bits, str(device))
    if key not in _SHIFTS_CACHE:
        _SHIFTS_CACHE[key] = torch.arange(8, dtype=torch.int64, device=device) * bits
    return _SHIFTS_CACHE[key]


def packed_size(n: int, bits: int) -> int:
    """Bytes used by `n` codes of `bits` bits (whole blocks of 8 codes; 8-bit codes are stored as is)."""
    return n if bits == 8 else -(-n // 8) * bits


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack uint8 codes (< 2**bits) along the last dim. [..., n] -> [..., ceil(n/8)*bits] uint8."""
    if not 1 <= bits <= 8:
        raise ValueError(f"bits={bits} must be in [1, 8]")
    if codes.dtype != torch.uint8:
        raise TypeError(f"codes must be uint8, got {codes.dtype}")
    if bits == 8:
        return codes.contiguous()
    *lead, n = codes.shape
    pad = (-n) % 8
    if pad:
        codes = torch.nn.functional.pad(codes, (0, pad))
    blocks = codes.reshape(*lead, -1, 8).to(torch.int64)  # [..., n/8, 8]
    word = (blocks << _shifts(bits, codes.device)).sum(-1)  # [..., n/8], < 2**(8*bits) <= 2**56
    byte_shifts = torch.arange(bits, dtype=torch.int64, device=codes.device) * 8
    out = (word.unsqueeze(-1) >> byte_shifts) & 0xFF  # [..., n/8, bits]
    return out.to(torch.uint8).reshape(*lead, -1)


def unpack(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of `pack`: [..., ceil(n/8)*bits] uint8 -> [..., n] uint8."""
    if not 1 <= bits <= 8:
        raise ValueError(f"bits={bits} must be in [1, 8]")
    *lead, m = packed.shape
    if m != packed_size(n, bits):
        raise ValueError(f"packed last dim {m} does not hold {n} codes of {bits} bits")
    if bits == 8:
        return packed
    b = packed.reshape(*lead, -1, bits).to(torch.int64)  # [..., n/8, bits]
    byte_shifts = torch.arange(bits, dtype=torch.int64, device=packed.device) * 8
    word = (b << byte_shifts).sum(-1)  # [..., n/8]
    codes = (word.unsqueeze(-1) >> _shifts(bits, packed.device)) & ((1 << bits) - 1)  # [..., n/8, 8]
    return codes.to(torch.uint8).reshape(*lead, -1)[..., :n]
