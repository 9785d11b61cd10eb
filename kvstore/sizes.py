"""Whole-session accounting: the bytes of every tensor a session's KV holds, against 16-bit KV.

A session's KV on the device is its `KVState`'s tensors (export is bit-exact, so the state's bytes are the
device's): sinks, the sealed region (codes, scales, zeros, outlier tables, 16-bit sides), the recent
window (model dtype, or INT8 codes and scales with `w8`) and the evictor's state. `state_size` measures a
state; `planned_size` gives the same figure on paper for a spec, a model shape and a token count (what a
cache holds after that many tokens without eviction), from the same layouts the stored blocks follow.

The baseline, `kv16_bytes`, is the same positions' keys and values at 16 bits (bf16/fp16 KV, no window):
2 sides x layers x KV heads x head_dim x tokens x 2 bytes. Stored figures (manifest + blocks + tail in a
tier) are compared against the same baseline with `fraction_of_16bit(stored_bytes)`.

Invariants:
- `state_size(s).total == s.nbytes`: every tensor counted once, in exactly one part.
- `planned_size(quant, shape, n) == state_size(state)` for the state of a cache of `shape` that took `n`
  tokens under `quant` (without eviction): the paper figure is the measured one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from kvstore.config import QuantConfig
from kvstore.layout import GROUP_FIELDS, SINK_FIELDS, TOKEN_FIELDS, ModelShape, layout_bytes, window_layout
from kvstore.quant.state import KVState
from kvstore.quant.window import WINDOW_FIELDS

PARTS = ("sinks", "sealed", "window", "other")


def part_of(name: str) -> str:
    """Which part of a session a state tensor named `name` (e.g. "3.k_codes", "evict.imp") belongs to."""
    field = name.partition(".")[2]
    if field in SINK_FIELDS:
        return "sinks"
    if field in TOKEN_FIELDS + GROUP_FIELDS:
        return "sealed"
    if field in WINDOW_FIELDS:
        return "window"
    return "other"


@dataclass(frozen=True)
class SessionSize:
    """Bytes of a session's KV by part (`PARTS`), for `tokens` positions of `elements` K and V elements."""

    tokens: int
    elements: int  # 2 x layers x kv_heads x head_dim x tokens (evicted positions count, at zero bytes)
    sinks: int = 0
    sealed: int = 0
    window: int = 0
    other: int = 0

    @property
    def total(self) -> int:
        return self.sinks + self.sealed + self.window + self.other

    @property
    def kv16_bytes(self) -> int:
        """The same positions' keys and values at 16 bits."""
        return 2 * self.elements

    @property
    def bytes_per_token(self) -> float:
        return self.total / self.tokens if self.tokens else 0.0

    @property
    def bits_per_element(self) -> float:
        return 8 * self.total / self.elements if self.elements else 0.0

    def fraction_of_16bit(self, nbytes: int | None = None) -> float:
        """`nbytes` (default: this session's device bytes, `total`) over 16-bit KV of the same positions."""
        return (self.total if nbytes is None else nbytes) / self.kv16_bytes if self.elements else 0.0

    def to_json(self) -> dict:
        return {"tokens": self.tokens, "bytes": self.total, "bytes_per_token": self.bytes_per_token,
                "bits_per_element": self.bits_per_element, "fraction_of_16bit": self.fraction_of_16bit(),
                **{p: getattr(self, p) for p in PARTS}}


def state_size(state: KVState) -> SessionSize:
    """Device bytes of every tensor of `state`, by part, with its element count (0 for an empty state)."""
    shape = ModelShape.of_state(state)
    elements = 2 * shape.layers * shape.kv_heads * shape.head_dim * state.num_tokens if shape else 0
    parts = dict.fromkeys(PARTS, 0)
    for name, a in state.tensors:
        parts[part_of(name)] += a.nbytes
    return SessionSize(state.num_tokens, elements, **parts)


def planned_size(quant: QuantConfig, shape: ModelShape, tokens: int) -> SessionSize:
    """`state_size` on paper: a cache of `shape` after `tokens` tokens under `quant`, without eviction (the
    window rule of `kvstore.quant.layer`: whole key groups outside the recent window are sealed)."""
    sinks = min(tokens, quant.sinks)
    sealed = max(0, tokens - sinks - quant.residual) // quant.key_group * quant.key_group
    sink_bytes = 2 * shape.layers * shape.kv_heads * sinks * shape.head_dim * shape.numpy_dtype.itemsize
    region = layout_bytes(quant.replace(sinks=0), shape, sealed, 0) if sealed else 0
    win = sum(math.prod(s) * dt.itemsize for _, dt, s in window_layout(quant, shape, tokens - sinks - sealed))
    elements = 2 * shape.layers * shape.kv_heads * shape.head_dim * tokens
    return SessionSize(tokens, elements, sinks=sink_bytes, sealed=region, window=win)
