"""`KVState`: the exported, device-independent state of a quantized KV cache.

It is what crosses process boundaries (Ray moves numpy arrays, not torch tensors) and what the
codec serializes. Restoring a cache from a `KVState` gives a cache whose every tensor is
bit-identical to the one exported, so greedy continuation is unchanged.

Invariants:
- `tensors` is an ordered list of (name, array); names are unique; arrays are C-contiguous.
- `meta` holds only JSON-serializable scalars, lists and dicts (never objects to be unpickled).
- `num_tokens` is the number of token positions the cache covers (its `get_seq_length()`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass
class KVState:
    num_tokens: int
    quant_spec: str
    meta: dict[str, Any] = field(default_factory=dict)
    tensors: list[tuple[str, np.ndarray]] = field(default_factory=list)

    @property
    def nbytes(self) -> int:
        """Raw bytes of all tensors (before any entropy coding)."""
        return sum(a.nbytes for _, a in self.tensors)

    def tensor_dict(self) -> dict[str, np.ndarray]:
        return dict(self.tensors)

    def equals(self, other: KVState) -> bool:
        """Bit-equality of every tensor and of the metadata."""
        if (self.num_tokens, self.quant_spec, self.meta) != (other.num_tokens, other.quant_spec, other.meta):
            return False
        if [n for n, _ in self.tensors] != [n for n, _ in other.tensors]:
            return False
        return all(
            a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()
            for (_, a), (_, b) in zip(self.tensors, other.tensors)
        )
