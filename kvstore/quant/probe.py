"""On-line quality probe: what does quantization do to this decode step's attention?

The full-precision window holds the next tokens to be sealed. On a sampled decode step (one query), for
each layer, the oldest whole key-group blocks of that window are sealed and read back exactly as sealing
will store them (`QuantizedKVLayer.probe_window`), and the step's attention over the layer's keys and
values is computed twice: with those tokens in full precision (what the model used) and quantized.
Reported per layer:
- `kl`: KL(p_fp || p_quantized) of the attention distributions, mean over query heads;
- `rel_err`: ||o_quantized - o_fp|| / ||o_fp|| of the attention outputs.
These are the quantization error a session is about to take on, measured against the exact values the
worker still holds; cost is one extra attention per layer on sampled steps only.

Shapes: query [B, Hq, 1, D]; key/value [B, Hkv, n, D]; attention_mask None, bool or additive [B, 1, 1, n].
"""

from __future__ import annotations

import torch


def _attend(q, k, v, scaling, mask):
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, dim=1).float(), v.repeat_interleave(rep, dim=1).float()
    scores = (q.float() @ k.transpose(-1, -2)) * scaling  # [B, Hq, 1, n]
    if mask is not None:
        m = mask[..., -scores.shape[-1]:]
        scores = scores.masked_fill(~m, float("-inf")) if m.dtype == torch.bool else scores + m.float()
    logp = torch.log_softmax(scores, dim=-1)
    return logp, logp.exp() @ v


def measure(layer, query, key, value, scaling: float, attention_mask=None) -> tuple[float, float] | None:
    """(kl, rel_err) for one layer of a one-query step, or None when the window has no whole block."""
    if query.shape[-2] != 1:
        return None
    probe = layer.probe_window()
    if probe is None:
        return None
    off, kq, vq = probe
    w = kq.shape[-2]
    key_q, value_q = key.clone(), value.clone()
    key_q[..., off:off + w, :] = kq
    value_q[..., off:off + w, :] = vq
    lp_ref, o_ref = _attend(query, key, value, scaling, attention_mask)
    lp_q, o_q = _attend(query, key_q, value_q, scaling, attention_mask)
    p = lp_ref.exp()
    kl = torch.nan_to_num(p * (lp_ref - lp_q), nan=0.0).sum(-1).clamp_min(0).mean()
    rel = (o_q - o_ref).norm() / o_ref.norm().clamp_min(1e-12)
    return float(kl), float(rel)
