"""Cutting an exported KV state into content blocks and a per-session tail, and joining them back.

A `QuantizedKVLayer`'s sealed tensors all grow along dim -2, in tokens (`*_codes`, `*_fp`, `v_scale`,
`v_zero`) or in key groups of `key_group` tokens (`k_scale`, `k_zero`, outlier tables `*_oidx`/`*_oval`),
so the sealed region is the concatenation of per-block slices. With a `BlockGrid` of B tokens per block
(B a multiple of key_group) block i holds, for every layer in order, the slices of the sealed tokens
[i*B, (i+1)*B) (sealed coordinates: positions after the sinks); block 0 also holds the sink tensors
`k_sink`/`v_sink`. Everything else is the *tail*: the full-precision window, sealed groups past the last
whole block, the evictor's state, and the state's metadata (including the original tensor order).

Invariants:
- `join(split(s, grid, n)) .equals(s)`: bit-exact, same tensor order, for every n <= whole blocks held.
- A block's tensors depend only on its own tokens' sealed codes (and block 0's on the sinks too), so a
  block computed by one session can stand in for the same block of another when the bytes are equal.
- `layout(...)` predicts every block tensor's (name, dtype, shape) from the quant spec and model shape, so
  stored blocks need not carry shapes, and a decoded block that does not fit is rejected.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np

from kvstore.config import QuantConfig
from kvstore.quant.outliers import count as outlier_count
from kvstore.quant.outliers import index_dtype
from kvstore.quant.pack import packed_size
from kvstore.quant.state import KVState

TOKEN_FIELDS = ("k_codes", "v_codes", "k_fp", "v_fp", "v_scale", "v_zero")
GROUP_FIELDS = ("k_scale", "k_zero", "k_oidx", "k_oval", "v_oidx", "v_oval")
SINK_FIELDS = ("k_sink", "v_sink")
# the order of a block's tensors within a layer (`split` and `layout` agree on it)
FIELD_ORDER = ("k_sink", "v_sink", "k_fp", "k_codes", "k_scale", "k_zero", "k_oidx", "k_oval",
               "v_fp", "v_codes", "v_scale", "v_zero", "v_oidx", "v_oval")
Tensors = list[tuple[str, np.ndarray]]


_NUMPY_OF = {"torch.float32": "float32", "torch.float16": "float16", "torch.bfloat16": "int16",
             "torch.float64": "float64"}  # bfloat16 travels as its 16-bit patterns (kvstore.quant.cache)


@dataclass(frozen=True)
class ModelShape:
    """What block layouts need to know of the model: layers, KV heads, head_dim and the KV dtype."""

    layers: int
    kv_heads: int
    head_dim: int
    dtype: str  # torch dtype name of sinks, windows and 16-bit sides, e.g. "torch.float32"

    def __post_init__(self) -> None:
        if self.dtype not in _NUMPY_OF:
            raise ValueError(f"unsupported KV dtype {self.dtype!r}")

    @property
    def numpy_dtype(self) -> np.dtype:
        return np.dtype(_NUMPY_OF[self.dtype])

    def to_json(self) -> dict:
        return {"layers": self.layers, "kv_heads": self.kv_heads, "head_dim": self.head_dim, "dtype": self.dtype}

    @classmethod
    def from_json(cls, d: dict) -> "ModelShape":
        return cls(int(d["layers"]), int(d["kv_heads"]), int(d["head_dim"]), str(d["dtype"]))

    @classmethod
    def of_state(cls, state: KVState) -> "ModelShape | None":
        """The shape of the model a state came from, or None when it holds no layer tensors yet."""
        t = state.tensor_dict()
        if "0.k_win" not in t or not state.meta.get("layer_dtypes", [""])[0]:
            return None
        a = t["0.k_win"]
        return cls(int(state.meta["num_layers"]), int(a.shape[1]), int(a.shape[-1]), state.meta["layer_dtypes"][0])


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


def layout(quant: QuantConfig, shape: ModelShape, block_tokens: int, index: int) -> list[tuple[str, np.dtype, tuple]]:
    """Every tensor of block `index` as (name, dtype, shape), in the order `split` produces them."""
    return list(_layout(quant, shape, block_tokens, index == 0))


def layout_bytes(quant: QuantConfig, shape: ModelShape, block_tokens: int, index: int) -> int:
    """Bytes of block `index`'s tensors as held in memory."""
    return _layout_bytes(quant, shape, block_tokens, index == 0)


@functools.lru_cache(maxsize=64)
def _layout_bytes(quant: QuantConfig, shape: ModelShape, block_tokens: int, first: bool) -> int:
    return sum(math.prod(s) * dt.itemsize for _, dt, s in _layout(quant, shape, block_tokens, first))


@functools.lru_cache(maxsize=64)
def _layout(quant: QuantConfig, shape: ModelShape, block_tokens: int, first: bool) -> tuple:
    index = 0 if first else 1
    h, d, b, g = shape.kv_heads, shape.head_dim, block_tokens, quant.key_group
    kv_dtype = shape.numpy_dtype
    out = []
    for l in range(shape.layers):
        if index == 0 and quant.sinks:
            out += [(f"{l}.k_sink", kv_dtype, (1, h, quant.sinks, d)), (f"{l}.v_sink", kv_dtype, (1, h, quant.sinks, d))]
        kb, vb = quant.bits_for(l)
        for side, bits in (("k", kb), ("v", vb)):
            if bits == 16:
                out.append((f"{l}.{side}_fp", kv_dtype, (1, h, b, d)))
                continue
            vg = min(quant.value_group, d)
            meta_shape = (1, h, b // g, d) if side == "k" else (1, h, b, d // vg)
            out += [(f"{l}.{side}_codes", np.dtype(np.uint8), (1, h, b, packed_size(d, bits))),
                    (f"{l}.{side}_scale", np.dtype(np.float16), meta_shape),
                    (f"{l}.{side}_zero", np.dtype(np.float16), meta_shape)]
            if quant.outliers:
                k = outlier_count(quant.outliers, h * g * d)
                out += [(f"{l}.{side}_oidx", np.dtype(str(index_dtype(h * g * d)).removeprefix("torch.")), (b // g, k)),
                        (f"{l}.{side}_oval", np.dtype(np.float16), (b // g, k))]
    return tuple(out)


def _torch_name(dtype: np.dtype, shape: ModelShape) -> str:
    return shape.dtype if dtype == shape.numpy_dtype else f"torch.{dtype.name}"


def prefix_state(blocks: list[Tensors], quant: QuantConfig, shape: ModelShape, block_tokens: int) -> KVState:
    """The state of a cache that adopted `blocks` as its first tokens, everything sealed (window empty).

    This is what `QuantizedKVCache.seal_all` leaves after the same tokens were run through the model the
    canonical way, so a session that adopts a stored prefix can be replayed exactly."""
    n = quant.sinks + len(blocks) * block_tokens
    h, d, L = shape.kv_heads, shape.head_dim, shape.layers
    empty = np.zeros((1, h, 0, d), dtype=shape.numpy_dtype)
    tail = [(f"{l}.{side}_win", empty) for l in range(L) for side in "kv"]
    names = [name for name, _, _ in layout(quant, shape, block_tokens, 0)]
    dtypes = {name: _torch_name(dt, shape) for name, dt, _ in layout(quant, shape, block_tokens, 0)}
    dtypes.update({name: shape.dtype for name, _ in tail})
    order = [n_ for l in range(L) for n_ in [x for x in names if x.startswith(f"{l}.")] + [f"{l}.k_win", f"{l}.v_win"]]
    meta = {"num_layers": L, "layer_tokens": [n] * L, "layer_staged": [0] * L, "layer_evicted": [0] * L,
            "layer_forced": [n - quant.sinks] * L, "layer_dtypes": [shape.dtype] * L, "tensor_dtypes": dtypes,
            "order": order, "blocks": len(blocks), "block_tokens": block_tokens}
    return join(blocks, KVState(n, quant.spec(), meta, tail))
