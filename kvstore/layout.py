"""The shapes of a stored block: which tensors a block holds, in which order, with which dtypes and shapes.

A `QuantizedKVLayer`'s sealed tensors all grow along dim -2, in tokens (`TOKEN_FIELDS`: `*_codes`, `*_fp`,
`v_scale`, `v_zero`) or in key groups of `key_group` tokens (`GROUP_FIELDS`: `k_scale`, `k_zero`, outlier
tables `*_oidx`/`*_oval`); block 0 also holds the sink tensors (`SINK_FIELDS`). `kvstore.prefix.blocks`
cuts a state into blocks along those fields; the codecs (`kvstore.codec.block`, `kvstore.codec.cold_block`)
store a block without its names, dtypes and shapes, because `layout` predicts them.

Invariants (pure functions of their arguments):
- `layout(quant, shape, block_tokens, index)` lists every tensor of block `index` as (name, dtype, shape),
  layer by layer, each layer's fields in `FIELD_ORDER`; it depends on `index` only through `index == 0`.
- `layout_bytes(...)` is the sum of those tensors' in-memory bytes.
- A `ModelShape` always has a supported KV dtype (`numpy_dtype` is defined for it).
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
# the order of a block's tensors within a layer (`layout` and `kvstore.prefix.blocks.split` agree on it)
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
    def of_state(cls, state: KVState) -> ModelShape | None:
        """The shape of the model a state came from, or None when it holds no layer tensors yet."""
        t = state.tensor_dict()
        if "0.k_win" not in t or not state.meta.get("layer_dtypes", [""])[0]:
            return None
        a = t["0.k_win"]
        return cls(int(state.meta["num_layers"]), int(a.shape[1]), int(a.shape[-1]), state.meta["layer_dtypes"][0])

    def torch_name(self, dtype: np.dtype) -> str:
        """The torch dtype name a tensor of numpy `dtype` in this model's blocks stands for."""
        return self.dtype if dtype == self.numpy_dtype else f"torch.{dtype.name}"


def window_layout(quant: QuantConfig, shape: ModelShape, tokens: int) -> list[tuple[str, np.dtype, tuple]]:
    """Every window tensor of a state whose layers hold `tokens` window entries, as (name, dtype, shape), in
    the order a layer exports them (`kvstore.quant.window`): `k_win`/`v_win` in the model dtype, or with
    `window_bits=8` int8 codes each followed by its fp16 per-token scale `*_win_scale` [1, H, tokens, 1]."""
    h, d = shape.kv_heads, shape.head_dim
    out = []
    for l in range(shape.layers):
        for side in "kv":
            if quant.window_bits == 8:
                out += [(f"{l}.{side}_win", np.dtype(np.int8), (1, h, tokens, d)),
                        (f"{l}.{side}_win_scale", np.dtype(np.float16), (1, h, tokens, 1))]
            else:
                out.append((f"{l}.{side}_win", shape.numpy_dtype, (1, h, tokens, d)))
    return out


def layout(quant: QuantConfig, shape: ModelShape, block_tokens: int, index: int) -> list[tuple[str, np.dtype, tuple]]:
    """Every tensor of block `index` as (name, dtype, shape), in the order `kvstore.prefix.blocks.split`
    produces them."""
    return list(_layout(quant, shape, block_tokens, index == 0))


def layout_bytes(quant: QuantConfig, shape: ModelShape, block_tokens: int, index: int) -> int:
    """Bytes of block `index`'s tensors as held in memory."""
    return _layout_bytes(quant, shape, block_tokens, index == 0)


@functools.lru_cache(maxsize=64)
def _layout_bytes(quant: QuantConfig, shape: ModelShape, block_tokens: int, first: bool) -> int:
    return sum(math.prod(s) * dt.itemsize for _, dt, s in _layout(quant, shape, block_tokens, first))


@functools.lru_cache(maxsize=64)
def _layout(quant: QuantConfig, shape: ModelShape, block_tokens: int, first: bool) -> tuple:
    h, d, b, g = shape.kv_heads, shape.head_dim, block_tokens, quant.key_group
    kv_dtype = shape.numpy_dtype
    out = []
    for l in range(shape.layers):
        if first and quant.sinks:
            sink = (1, h, quant.sinks, d)
            out += [(f"{l}.k_sink", kv_dtype, sink), (f"{l}.v_sink", kv_dtype, sink)]
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
