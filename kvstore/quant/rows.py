"""`RowBatch`: one batched forward pass whose rows belong to different caches.

A pass of shape [R, 1]: row r feeds one token, at the next position of its cache `caches[r]`, or is
padding (`None`: any token, no cache). Everything row-wise in the model — embeddings, norms, projections,
MLP, lm_head — runs on all R rows at once; attention runs per row, in row order, each row over its own
cache: the row's key/value are appended to its cache's layer (the window entries of all rows, and their
readings, are computed in one call: they are per token, so bit-identical) and its query attends to
everything that layer then holds. On CPU (bf16 or float32) the rows of a layer attend through one call
(`RowAttention`, kvstore/quant/row_attention.py), which also writes each row's new readings into its
decode view; a row attending to more than `ROW_KERNEL_KEYS` keys, a row whose step is not a plain append
(a seal, the sinks, a view rebuild) or whose cache is observed (eviction, the quality probe, through
`attention.attend`) is done on its own between that call's flushes. Elsewhere every row goes through
torch's SDPA. Several rows may share a cache when they are that cache's consecutive next tokens in row
order (replay packs a session's batched decode steps so); each then sees exactly the keys it saw when it
ran as one row among other sessions' rows.

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

from functools import partial

import torch
import torch.nn.functional as F
from transformers.cache_utils import Cache

from kvstore.quant import attention, row_attention
from kvstore.quant.attention import attend
from kvstore.quant.rotation import hadamard_rows
from kvstore.quant.row_attention import RowAttention, attend_one
from kvstore.quant.window import BatchRow, NewRows

# A row attending to more keys than this goes torch's SDPA way (its blocked kernel for long rows); up to it, the
# one-call way (`RowAttention`: a 16-row pass at 1,000 and 2,048 tokens takes the same time either way, at
# 100-250 tokens 10-20% less). A function of the row's own state, so the same in a pass and its replay.
ROW_KERNEL_KEYS = 2048


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
        forms = [None if c is None else c.layers[idx].returns_rotated for c in self.caches]
        rotated_k = [bool(f and f["k"]) for f in forms]
        q = query
        if any(rotated_k):  # rotated row by row: the same bits as one row at a time
            held = [turn for turn, f in zip(rotated_k, forms) if f is not None]
            q = hadamard_rows(query) if all(held) else torch.where(
                torch.tensor(rotated_k, device=q.device).view(-1, 1, 1, 1), hadamard_rows(query), query)
        rotated_v = [bool(f and f["v"]) for f in forms]
        if row_attention.serves(query):
            return self._attend_in_one(module, q, key, value, window, rotated_v, **kwargs), None
        out = self._attend_by_row(module, q, key, value, window, **kwargs)
        held = [turn for turn, f in zip(rotated_v, forms) if f is not None]
        if held and all(held):  # the usual case: one spec. A padding row's zeros rotate to zeros
            out = hadamard_rows(out)
        elif any(rotated_v):  # outputs of rows whose values come rotated go back, all rows at once (row by row)
            out = torch.where(torch.tensor(rotated_v, device=out.device).view(-1, 1, 1, 1), hadamard_rows(out), out)
        return out, None

    def _attend_in_one(self, module, query, key, value, window, rotated_v, **kwargs):
        """Rows whose layer appends the short way and attends to at most `ROW_KERNEL_KEYS` keys go through one
        `RowAttention` call, which writes their readings into their decode views; the others are done in row
        order between its flushes (a flush before each), so every row sees what it would one at a time."""
        scaling = kwargs.get("scaling")
        att = RowAttention(query, query.shape[-1] ** -0.5 if scaling is None else scaling, query.dtype)
        done = {}  # row -> [1, 1, Hq, D], for rows attended outside `att`
        new = {}  # reading form -> every row's window entries and readings, computed at once (per token: same bits)
        for r, cache in enumerate(self.caches):
            if cache is None:
                continue
            layer = cache.layers[module.layer_idx]
            batch = _new_rows(new, layer, key, value)
            observed = attention.observed(cache)
            if not observed and layer.appends_one(batch):  # a decode step's common case
                if not layer.view.room():
                    att.flush()  # the view's rows are copied when it grows: none may be waiting
                    layer.view.make_room()
                n = layer.append_one_unread(BatchRow(batch.keys, r), BatchRow(batch.values, r))
                start = first_seen(layer, n, window)
                if n - start <= ROW_KERNEL_KEYS:
                    att.add(r, layer.view.kv, n, start, batch.reads, r, rotated_v[r])
                    continue
                att.flush()
                layer.view.write_both(n - 1, batch.reads[:, r:r + 1])
                k, v = layer.view.read()
            else:
                att.flush()
                k, v = _append_row(layer, batch, r, key, value)
                n = k.shape[-2]
                start = first_seen(layer, n, window)
            sdpa = partial(kernel_sdpa, start=start) if n - start <= ROW_KERNEL_KEYS else row_sdpa
            mask = None if start == 0 else (torch.arange(n, device=k.device) >= start).view(1, 1, 1, -1)
            if observed:
                done[r], _ = attend(cache, module, query[r:r + 1], k, v, mask, sdpa=sdpa, rotate=False, **kwargs)
            elif sdpa is row_sdpa:
                done[r], _ = row_sdpa(module, query[r:r + 1], k, v, mask, **kwargs)
            else:
                att.add(r, torch.stack((k, v)).contiguous(), n, start, rotate=rotated_v[r])
                continue
            if rotated_v[r]:
                done[r] = hadamard_rows(done[r])
        att.flush()
        out = att.output()
        for r, o in done.items():
            out[r:r + 1] = o
        return out

    def _attend_by_row(self, module, query, key, value, window, **kwargs):
        """Each row appended to its cache and attended with torch's SDPA, one at a time (devices and dtypes
        `RowAttention` does not serve)."""
        idx = module.layer_idx
        pad = torch.zeros(1, 1, query.shape[1], query.shape[3], dtype=query.dtype, device=query.device)
        outs = [pad] * query.shape[0]
        queries = query.split(1)  # row by row, as views (one call instead of one slice per row)
        new = {}  # reading form -> every row's window entries and readings, computed at once (per token: same bits)
        for r, cache in enumerate(self.caches):
            if cache is None:
                continue
            layer = cache.layers[idx]
            k, v = _append_row(layer, _new_rows(new, layer, key, value), r, key, value)
            mask = None
            if window and k.shape[-2] > window:  # (every held key past the window: all true when none is masked)
                seen = torch.arange(k.shape[-2], device=k.device) >= first_seen(layer, k.shape[-2], window)
                mask = seen.view(1, 1, 1, -1)
            if not attention.observed(cache):  # nothing observes attention: just compute it
                outs[r], _ = row_sdpa(module, queries[r], k, v, mask, **kwargs)
            else:
                outs[r], _ = attend(cache, module, queries[r], k, v, mask, sdpa=row_sdpa, rotate=False, **kwargs)
        return torch.cat(outs)


def _new_rows(new: dict, layer, key: torch.Tensor, value: torch.Tensor) -> NewRows:
    """Every row's window entries and readings in `layer`'s reading form, computed once per form and pass (they
    are per token: the bits each row's layer would compute alone); `new` holds them by form."""
    form = layer.reading_form
    batch = new.get(form)
    if batch is None:
        batch = new[form] = layer.new_rows(key, value)
    return batch


def _append_row(layer, batch: NewRows, r: int, key: torch.Tensor, value: torch.Tensor):
    """Row r's token appended to `layer` the way one pass of its own would (the short way where `appends_one`
    admits it, else `update`, which takes the sinks, seals and rebuilds the view); every held key and value for
    attention, [1, Hkv, n, D] each."""
    mine = batch.row(r)
    if layer.appends_one(mine):  # no need of the row's own key and value
        return layer.append_one(mine)
    return layer.update(key[r:r + 1], value[r:r + 1], new=mine)


def first_seen(layer, n: int, window: int | None) -> int:
    """The first of a layer's n held keys its newest query sees: a sliding-window layer masks keys at positions
    at or before num_tokens - 1 - window (held key j is at position n_evicted + j); 0 otherwise."""
    if not window or n <= window:
        return 0
    return max(0, layer.num_tokens - window - layer.n_evicted)


def kernel_sdpa(module, query, key, value, attention_mask, scaling=None, start=0, **_):
    """`row_sdpa` computed as `RowAttention` computes it (keys before `start` unseen; the mask, which says the
    same, is not read): [1, Hq, 1, D] -> [1, 1, Hq, D]."""
    return attend_one(query, key, value, query.shape[-1] ** -0.5 if scaling is None else scaling, start), None


def row_sdpa(module, query, key, value, attention_mask, scaling=None, **_):
    """One row's (or one packed segment's) attention: torch's SDPA with grouped KV heads, [1, Hq, q, D] ->
    [1, q, Hq, D]. (transformers' wrapper checks, repeats the KV heads and reshapes per call; a batched pass
    calls this once per row or segment and layer.)"""
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, scale=scaling,
                                         enable_gqa=query.shape[1] != key.shape[1])
    return out.transpose(1, 2), None
