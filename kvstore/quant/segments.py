"""`forward_segments`: one packed prefill pass whose rows are several caches' token runs (*segments*).

A pass of shape [1, R]: segment i feeds its tokens at the next positions of its cache, the segments side
by side from row 0, rows after the last one padding (token 0, position 0, no cache). Everything row-wise in
the model — embeddings, norms, projections, MLP — runs on all R rows at once; attention runs segment by
segment, each over its own cache: the segment's keys and values are appended to the cache's layers
(`QuantizedKVLayer.update`, exactly as a pass of the cache's own appends them) and its queries attend
causally to everything the layer then holds, through the same `attention.attend` a pass of the cache's own
uses (rotated bases, quality probe), with torch's SDPA called directly (`rows.row_sdpa`). lm_head runs on a fixed `LOGIT_ROWS` rows: the segments' last rows,
then repeats of the last of them, so the logits too are computed at one shape whatever the segment count.

Why: a prompt of 64 tokens alone is a GEMM of 64 rows, well below this CPU's best rows-per-weight-read;
several prompts side by side run at the rate of a long prompt (measured in docs/BENCHMARKS.md).

Invariants:
- Given batch invariance of the row-wise ops at R rows and of lm_head at LOGIT_ROWS rows (checked at start
  by the worker, services/worker/batching.py), what a pass leaves in a segment's cache and the segment's
  logits do not depend on the other segments, nor on the rows the segment sits in.
- A segment's attention is a function of its cache and its own rows only: query i of a segment of n tokens
  sits at position p = num_tokens - n + i and sees held keys at positions <= p (and > p - window on a
  sliding-window layer); held entries map to the last positions, as transformers' masks assume.
- At most LOGIT_ROWS segments per pass; one cache at most once; caches with an evictor are refused (it
  acts between whole passes of the cache's own).
"""

from __future__ import annotations

import torch

from kvstore.quant import attention
from kvstore.quant.attention import attend
from kvstore.quant.rows import RowBatch, row_sdpa

LOGIT_ROWS = 16  # lm_head runs on this many rows in every packed pass (at most this many segments)


@torch.inference_mode()
def forward_segments(model, segments: list[tuple[object, list[int]]], size: int) -> torch.Tensor:
    """One packed pass of shape [1, size] through `model` (kvstash attention installed): segment i feeds
    `segments[i][1]` on top of cache `segments[i][0]`. Returns float32 logits [len(segments), vocab], each
    segment's last position."""
    if not 0 < len(segments) <= LOGIT_ROWS:
        raise ValueError(f"a packed pass takes 1..{LOGIT_ROWS} segments, not {len(segments)}")
    if len({id(c) for c, _ in segments}) != len(segments):
        raise ValueError("a packed pass takes each cache at most once")
    total = sum(len(ids) for _, ids in segments)
    if any(not ids for _, ids in segments) or total > size:
        raise ValueError(f"segments of {[len(ids) for _, ids in segments]} tokens do not fit a pass of {size} rows")
    if any(getattr(c, "evictor", None) is not None for c, _ in segments):
        raise ValueError("a cache with an evictor prefills in a pass of its own")
    ids = torch.zeros(1, size, dtype=torch.long)
    pos = torch.zeros(1, size, dtype=torch.long)
    spans, ends, row = [], [], 0
    for cache, toks in segments:
        n, p = len(toks), cache.get_seq_length()
        ids[0, row:row + n] = torch.tensor(toks, dtype=torch.long)
        pos[0, row:row + n] = torch.arange(p, p + n)
        spans.append((row, row + n, cache))
        ends.append(row + n - 1)
        row += n
    keep = torch.tensor(ends + [ends[-1]] * (LOGIT_ROWS - len(ends)), dtype=torch.long)
    device, batch = model.device, SegmentBatch(spans, size)
    with attention.active(batch):
        out = model(input_ids=ids.to(device), position_ids=pos.to(device), past_key_values=batch, use_cache=True,
                    logits_to_keep=keep.to(device))
    return out.logits[0, :len(segments)].float()


class SegmentBatch(RowBatch):
    """The `past_key_values` of a packed pass: hands each segment to its own cache inside attention."""

    def __init__(self, spans: list[tuple[int, int, object]], size: int):
        super().__init__([None] * size)
        self.spans = spans

    def attend_rows(self, module, query, key, value, **kwargs):
        """query [1, Hq, R, D], key/value [1, Hkv, R, D] -> output [1, R, Hq, D]; padding rows are zeros."""
        if query.shape[0] != 1 or query.shape[2] != len(self.caches):
            raise ValueError(f"a packed pass of {len(self.caches)} rows got queries of shape {tuple(query.shape)}")
        idx = module.layer_idx
        window = kwargs.get("sliding_window") or getattr(module, "sliding_window", None)
        out = query.new_zeros(1, query.shape[2], query.shape[1], query.shape[3])
        for start, stop, cache in self.spans:
            layer = cache.layers[idx]
            k, v = layer.update(key[:, :, start:stop], value[:, :, start:stop])
            mask = causal_mask(stop - start, k.shape[-2], layer.num_tokens, layer.n_evicted, window, k.device)
            o, _ = attend(cache, module, query[:, :, start:stop], k, v, mask, sdpa=row_sdpa, **kwargs)
            out[:, start:stop] = o
        return out, None


def causal_mask(n: int, held: int, num_tokens: int, n_evicted: int, window: int | None,
                device: torch.device) -> torch.Tensor:
    """[1, 1, n, held] bool: query i (position num_tokens - n + i) may see held key j (position n_evicted + j)."""
    q = torch.arange(num_tokens - n, num_tokens, device=device).view(-1, 1)
    k = torch.arange(held, device=device).view(1, -1) + n_evicted
    mask = k <= q
    if window:
        mask &= k > q - window
    return mask.view(1, 1, n, held)
