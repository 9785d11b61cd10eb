"""Cutting an exported KV state into content blocks and a per-session tail, and joining them back.

A `QuantizedKVLayer`'s sealed tensors all grow along dim -2, in tokens or in key groups of `key_group`
tokens (`kvstore.layout`: `TOKEN_FIELDS`, `GROUP_FIELDS`), so the sealed region is the concatenation of
per-block slices. With a `BlockGrid` of B tokens per block (B a multiple of key_group) block i holds, for
every layer in order, the slices of the sealed tokens [i*B, (i+1)*B) (sealed coordinates: positions after
the sinks); block 0 also holds the sink tensors `k_sink`/`v_sink`. Everything else is the *tail*: the
full-precision window, sealed groups past the last whole block, the evictor's state, and the state's
metadata (including the original tensor order).

Invariants:
- `join(split(s, grid, n)) .equals(s)`: bit-exact, same tensor order, for every n <= whole blocks held.
- A block's tensors depend only on its own tokens' sealed codes (and block 0's on the sinks too), so a
  block computed by one session can stand in for the same block of another when the bytes are equal.
- Every block `split` returns fits `kvstore.layout.layout(quant, shape, block_tokens, i)` exactly (names,
  dtypes, shapes, order), so stored blocks need not carry shapes, and a decoded block that does not fit is
  rejected.
"""

from __future__ import annotations

import numpy as np

from kvstore.config import QuantConfig
from kvstore.layout import (
    FIELD_ORDER,
    GROUP_FIELDS,
    SINK_FIELDS,
    TOKEN_FIELDS,
    ModelShape,
    Tensors,
    layout,
    window_layout,
)
from kvstore.quant.state import KVState


def _unit(field: str, quant: QuantConfig) -> int:
    if field in TOKEN_FIELDS:
        return 1
    if field in GROUP_FIELDS:
        return quant.key_group
    raise KeyError(field)


def _rank(item: tuple[str, np.ndarray]) -> tuple[int, int]:
    layer, _, field = item[0].partition(".")
    return int(layer), FIELD_ORDER.index(field)


def whole_blocks(state: KVState, block_tokens: int) -> int:
    """Whole blocks in the state's sealed region (0 with eviction: its sealed tokens are not positions)."""
    if QuantConfig.parse(state.quant_spec).evict:
        return 0
    t = state.tensor_dict()
    n = min((t[f"{l}.{side}"].shape[-2] for l in range(int(state.meta["num_layers"]))
             for side in ("k_codes", "k_fp") if f"{l}.{side}" in t), default=0)
    return n // block_tokens


def split(state: KVState, block_tokens: int, n_blocks: int) -> tuple[list[Tensors], KVState]:
    """(blocks 0..n_blocks-1, tail) of `state`; see the module docstring."""
    quant = QuantConfig.parse(state.quant_spec)
    if block_tokens % quant.key_group:
        raise ValueError(f"block_tokens={block_tokens} is not a multiple of key_group={quant.key_group}")
    if n_blocks > whole_blocks(state, block_tokens):
        raise ValueError(f"the state holds {whole_blocks(state, block_tokens)} whole blocks, not {n_blocks}")
    blocks: list[Tensors] = [[] for _ in range(n_blocks)]
    tail: Tensors = []
    for name, a in state.tensors:
        field = name.partition(".")[2]
        if n_blocks and field in SINK_FIELDS:
            blocks[0].append((name, a))
            continue
        if not n_blocks or field not in TOKEN_FIELDS + GROUP_FIELDS:
            tail.append((name, a))
            continue
        per = block_tokens // _unit(field, quant)
        for i in range(n_blocks):
            blocks[i].append((name, np.ascontiguousarray(a[..., i * per:(i + 1) * per, :])))
        tail.append((name, np.ascontiguousarray(a[..., n_blocks * per:, :])))
    for block in blocks:
        block.sort(key=_rank)
    meta = {**state.meta, "order": [n for n, _ in state.tensors], "blocks": n_blocks, "block_tokens": block_tokens}
    return blocks, KVState(state.num_tokens, state.quant_spec, meta, tail)


def join(blocks: list[Tensors], tail: KVState) -> KVState:
    """Inverse of `split`: concatenate the blocks' slices in front of the tail's, in the original order."""
    meta = dict(tail.meta)
    order = meta.pop("order", None)
    n_blocks, _ = meta.pop("blocks", 0), meta.pop("block_tokens", 0)
    if n_blocks != len(blocks):
        raise ValueError(f"the tail expects {n_blocks} blocks, {len(blocks)} given")
    parts: dict[str, list[np.ndarray]] = {}
    for block in blocks:
        for name, a in block:
            parts.setdefault(name, []).append(a)
    for name, a in tail.tensors:
        parts.setdefault(name, []).append(a)
    names = order if order is not None else list(parts)
    if set(names) != set(parts):
        raise ValueError(f"blocks and tail hold tensors {sorted(set(parts) ^ set(names))[:3]} the order does not name")
    out = [(n, parts[n][0] if len(parts[n]) == 1 else np.concatenate(parts[n], axis=-2)) for n in names]
    return KVState(tail.num_tokens, tail.quant_spec, meta, out)


def prefix_state(blocks: list[Tensors], quant: QuantConfig, shape: ModelShape, block_tokens: int) -> KVState:
    """The state of a cache that adopted `blocks` as its first tokens, everything sealed (window empty).

    This is what `QuantizedKVCache.seal_all` leaves after the same tokens were run through the model the
    canonical way, so a session that adopts a stored prefix can be replayed exactly."""
    n = quant.sinks + len(blocks) * block_tokens
    L = shape.layers
    win = window_layout(quant, shape, 0)
    tail = [(name, np.zeros(s, dtype=dt)) for name, dt, s in win]
    names = [name for name, _, _ in layout(quant, shape, block_tokens, 0)]
    dtypes = {name: shape.torch_name(dt) for name, dt, _ in layout(quant, shape, block_tokens, 0) + win}
    order = [n_ for l in range(L) for n_ in [x for x in names + [w for w, _, _ in win] if x.startswith(f"{l}.")]]
    meta = {"num_layers": L, "layer_tokens": [n] * L, "layer_staged": [0] * L, "layer_evicted": [0] * L,
            "layer_forced": [n - quant.sinks] * L, "layer_dtypes": [shape.dtype] * L, "tensor_dtypes": dtypes,
            "order": order, "blocks": len(blocks), "block_tokens": block_tokens}
    return join(blocks, KVState(n, quant.spec(), meta, tail))
