"""The library's entry point for running a model on a kvstash cache (what a worker imports, with
kvstore.config, kvstore.schedule and kvstore.storage).

Re-exports, one name each, of:
- `QuantizedKVCache` (kvstore/quant/cache.py): the transformers Cache holding a session's quantized, packed
  KV; `check_model_supported`, `check_spec_supported`, `rope_for` (which models and specs it serves);
- `KVState` (kvstore/quant/state.py): a cache's exported tensors, what storage saves and restores;
- `forward_rows` (kvstore/quant/rows.py): one batched pass whose rows belong to different caches;
- `forward_segments`, `LOGIT_ROWS` (kvstore/quant/segments.py): one packed prefill pass, several caches'
  token runs side by side;
- `attention` (the module kvstore/quant/attention.py): `install` the attention that reads kvstash caches
  into a model, `active(cache)` around its forward passes;
- `ModelShape` (kvstore/layout.py): a model's KV geometry;
- `key_weights` (kvstore/quant/key_weights.py): a model's cold key weight exponents (cold specs with qk).
Nothing is defined here; the invariants are the modules'.
"""

from __future__ import annotations

from kvstore.layout import ModelShape
from kvstore.quant import attention
from kvstore.quant.cache import QuantizedKVCache, check_model_supported, check_spec_supported, rope_for
from kvstore.quant.key_weights import key_weights
from kvstore.quant.rows import forward_rows
from kvstore.quant.segments import LOGIT_ROWS, forward_segments
from kvstore.quant.state import KVState

__all__ = ["LOGIT_ROWS", "KVState", "ModelShape", "QuantizedKVCache", "attention", "check_model_supported",
           "check_spec_supported", "forward_rows", "forward_segments", "key_weights", "rope_for"]
