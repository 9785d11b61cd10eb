"""`RowBatch`: one batched forward pass whose rows belong to different caches.

A pass of shape [R, 1]: row r feeds one token, at the next position of its cache `caches[r]`, or is
padding (`None`: any token, no cache). Everything row-wise in the model — embeddings, norms, projections,
MLP, lm_head — runs on all R rows at once; attention runs row by row, in row order, each row over its
own cache: the row's key/value are appended to its cache's layer (`QuantizedKVLayer.update`; the window
entries of all rows, and their readings, are computed in one call: they are per token, so bit-identical) and its
query attends to everything that layer then holds, through the same `attention.attend` a pass of the
cache's own uses (rotated bases, eviction, quality probe). Several rows may share a cache when they are
that cache's consecutive next tokens in row order (replay packs a session's batched decode steps so);
each then sees exactly the keys it saw when it ran as one row among other sessions' rows.

Invariants:
- Rows of one cache are consecutive positions in increasing row order (`RowBatch` checks the count).
- A padding row touches no cache and its output is zeros.
- Given batch invariance of the row-wise ops at R rows (checked at start by the worker,
  services/worker/batching.py), what a pass leaves in a cache and the logits of its rows do not depend
  on the other rows, nor on the slot a row sits in.
- Sliding-window layers (the `sliding_window` the model hands attention) mask keys at or before position p - window for a query
  at position p, as transformers' sliding mask does; full layers attend to every held key.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers.cache_utils import Cache

from kvstore.quant import attention
from kvstore.quant.attention import attend
from kvstore.quant.rotation import hadamard_rows


@torch.inference_mode()
def forward_rows(model, rows: list[tuple[object | None, int]], size: int) -> torch.Tensor:
    """One batched pass of shape [size, 1] through `model` (with the kvstash attention installed): row i
    feeds token `rows[i][1]` at the next position of cache `rows[i][0]` (None: a padding row); rows past
    len(rows) are padding (token 0). Rows of one cache must be its consecutive next tokens, in row order.
    Returns the float32 logits [len(rows), vocab]; a padding row's are meaningless."""
    if not 0 < len(rows) <= size:
        raise ValueError(f"{len(rows)} rows do not fit a pass of {size}")
    ids = torch.zeros(size, 1, dtype=torch.long)
    pos = torch.zeros(size, 1, dtype=torch.long)
    caches: list = [None] * size
    seen: dict[int, int] = {}
    for i, (cache, token) in enumerate(rows):
        ids[i, 0] = token
        if cache is not None:
            p = seen.get(id(cache), cache.get_seq_length())
            pos[i, 0], seen[id(cache)], caches[i] = p, p + 1, cache
    device, batch = model.device, RowBatch(caches)
    with attention.active(batch):
        out = model(input_ids=ids.to(device), position_ids=pos.to(device), past_key_values=batch, use_cache=True,
                    logits_to_keep=1)
    return out.logits[:len(rows), -1].float()


class RowBatch(Cache):
    """The `past_key_values` of a batched pass: hands each row to its own cache inside attention."""

    def __init__(self, caches: list):
        super().__init__(layers=[])
        self.caches = caches

    # transformers asks these to build masks and positions; attention ignores that mask (each row builds its own)
    def update(self, key_states, value_states, layer_idx, cache_kwargs=None):
        return key_states, value_states  # appended row by row in attend_rows

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        return query_length, 0

    def get_query_offset(self, layer_idx: int = 0) -> int:
        return 0

    @property
    def is_compileable(self) -> bool:
        return False

    def attend_rows(self, module, query, key, value, **kwargs):
        """query [R, Hq, 1, D], key/value [R, Hkv, 1, D] -> output [R, 1, Hq, D]."""
        rows = query.shape[0]
        if rows != len(self.caches) or query.shape[2] != 1:
            raise ValueError(f"a row batch of {len(self.caches)} rows got queries of shape {tuple(query.shape)}")
        idx = module.layer_idx
        window = kwargs.get("sliding_window") or getattr(module, "sliding_window", None)  # as the model passes it
        pad = torch.zeros(1, 1, query.shape[1], query.shape[3], dtype=query.dtype, device=query.device)
        outs = [pad] * rows
        forms = [None if c is None else c.layers[idx].returns_rotated for c in self.caches]
        queries = query.split(1)  # row by row, as views (one call instead of one slice per row)
        rotated_q = hadamard_rows(query).split(1) if any(f and f["k"] for f in forms) else None  # row by row: same bits
        new = {}  # reading form -> every row's window entries and readings, computed at once (per token: same bits)
        for r, cache in enumerate(self.caches):
            if cache is None:
                continue
            layer = cache.layers[idx]
            form = layer.reading_form
            if form not in new:
                new[form] = layer.new_rows(key, value).rows()
            mine = new[form][r]
            if layer.appends_one(mine):  # a decode step's common case: no need of the row's own key and value
                k, v = layer.append_one(mine)
            else:
                k, v = layer.update(key[r:r + 1], value[r:r + 1], new=mine)
            mask = None
            if window and k.shape[-2] > window:
                pos = torch.arange(k.shape[-2], device=k.device) + layer.n_evicted
                mask = (pos > layer.num_tokens - 1 - window).view(1, 1, 1, -1)
            q = rotated_q[r] if forms[r]["k"] else queries[r]
            if not attention.observed(cache):  # nothing observes attention: just compute it
                outs[r], _ = row_sdpa(module, q, k, v, mask, **kwargs)
            else:
                outs[r], _ = attend(cache, module, q, k, v, mask, sdpa=row_sdpa, rotate=False, **kwargs)
        out = torch.cat(outs)
        rotated_out = [bool(f and f["v"]) for f in forms]
        held = [r for r, f in zip(rotated_out, forms) if f is not None]
        if held and all(held):  # the usual case: one spec. A padding row's zeros rotate to zeros
            out = hadamard_rows(out)
        elif any(rotated_out):  # outputs of rows whose values come rotated go back, all rows at once (row by row)
            out = torch.where(torch.tensor(rotated_out, device=out.device).view(-1, 1, 1, 1), hadamard_rows(out), out)
        return out, None


def row_sdpa(module, query, key, value, attention_mask, scaling=None, **_):
    """One row's (or one packed segment's) attention: torch's SDPA with grouped KV heads, [1, Hq, q, D] ->
    [1, q, Hq, D]. (transformers' wrapper checks, repeats the KV heads and reshapes per call; a batched pass
    calls this once per row or segment and layer.)"""
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, scale=scaling,
                                         enable_gqa=query.shape[1] != key.shape[1])
    return out.transpose(1, 2), None
