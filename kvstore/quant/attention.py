"""The `kvstash` attention function: SDPA that can run in a cache's rotated basis.

A `QuantizedKVLayer` with `rotated_attention` hands attention some sides in the Hadamard-rotated basis
(`layer.returns_rotated`). Because the rotation H is orthonormal, attention is unchanged when queries
are rotated with keys, q·k = (qH)·(kH), and rotated values give a rotated output, softmax(.)·(VH) =
(softmax(.)·V)H. So this function rotates the queries when keys come rotated and rotates the output
back when values do; the cache then never rotates its sealed region back on read.

`install(model)` registers the function (name "kvstash") and switches the model to it; a model forward
run inside `active(cache)` lets the function find the cache's layers (a context variable, so
concurrent threads each see their own cache). Outside `active`, or for caches that need nothing, it is
plain SDPA. When the active cache's `probe` is a list, one-query steps also run the quality probe
(`kvstore.quant.probe`) per layer and append (layer, kl, rel_err) to it; a cache with an `evictor` gets
each layer's attention probabilities added to its tokens' importance (`kvstore.quant.evict`).

Shapes: query [B, Hq, q, D], key/value [B, Hkv, n, D]; output [B, q, Hq, D] (transformers' convention).
"""

from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar

from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

from kvstore.quant import evict, probe
from kvstore.quant.rotation import hadamard_rows

NAME = "kvstash"
# The version of how kvstash computes a pass (attention, window readings, rotations): bumped whenever a change
# alters the bits a pass leaves in a cache. Workers put it in the model fingerprint, so KV stored by a build
# that computed differently is rebuilt from the history, never restored next to KV computed the new way.
# 2: rotations at attention time (window readings, queries, outputs) are row by row (`hadamard_rows`).
# 3: a batched pass's rows attend in float32 through one call (`RowAttention`, kvstore/quant/row_attention.py).
NUMERICS = 3
_ACTIVE: ContextVar = ContextVar("kvstash_active_cache", default=None)


@contextmanager
def active(cache):
    token = _ACTIVE.set(cache)
    try:
        yield cache
    finally:
        _ACTIVE.reset(token)


def kv_attention(module, query, key, value, attention_mask, **kwargs):
    cache = _ACTIVE.get()
    if hasattr(cache, "attend_rows"):  # a batched pass whose rows belong to different caches (kvstore.quant.rows)
        return cache.attend_rows(module, query, key, value, **kwargs)
    return attend(cache, module, query, key, value, attention_mask, **kwargs)


def attend(cache, module, query, key, value, attention_mask, sdpa=sdpa_attention_forward, rotate=True, **kwargs):
    """Attention of `query` over `key`/`value` as `cache` (or None) hands them over: rotated sides undone,
    the cache's evictor and quality probe fed (they read, never change, what attention computes). `sdpa`
    computes the attention itself (transformers' SDPA by default). With `rotate=False` the caller has
    rotated the query already and rotates the output itself (a batched pass does it for all its rows at
    once: the rotation is row by row, `hadamard_rows`). Shapes as in the module docstring."""
    idx = getattr(module, "layer_idx", None)
    rot = None
    if cache is not None and idx is not None and idx < len(getattr(cache, "layers", ())):
        rot = getattr(cache.layers[idx], "returns_rotated", None)
    if rotate and rot and rot["k"]:
        query = hadamard_rows(query)
    out, weights = sdpa(module, query, key, value, attention_mask, **kwargs)
    if rotate and rot and rot["v"]:
        out = hadamard_rows(out)
    if rot is None or not observed(cache):  # no observer: attention is all there is
        return out, weights
    scaling = kwargs.get("scaling") or query.shape[-1] ** -0.5
    evictor = getattr(cache, "evictor", None)
    if evictor is not None:
        evictor.observe(evict.attention_probs(query, key, scaling))
        if idx == len(cache.layers) - 1:
            cache.end_step()
    if getattr(cache, "probe", None) is not None:
        res = probe.measure(cache.layers[idx], query, key, value, scaling, attention_mask)
        if res is not None:
            cache.probe.append((idx, *res))
    return out, weights


def observed(cache) -> bool:
    """Whether something reads `cache`'s attention besides the pass: its evictor, or a quality probe."""
    return getattr(cache, "evictor", None) is not None or getattr(cache, "probe", None) is not None


def install(model) -> None:
    """Register the kvstash attention (and SDPA's masks for it) and make `model` use it."""
    AttentionInterface.register(NAME, kv_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, sdpa_mask)  # without it, chunked prefill loses its causal mask
    model.set_attn_implementation(NAME)
