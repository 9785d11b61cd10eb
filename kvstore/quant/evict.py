"""Optional token eviction (off by default): one decision per token for the whole cache.

Tokens are judged when they leave the full-precision recent window, in batches of one key group
(`block` tokens): of each batch the `round(rate * block)` tokens with the least accumulated attention are
dropped from every layer and head at once (per-head eviction was found catastrophic), the rest go on to be
sealed. Importance is the attention mass a token received, summed over layers, query heads and queries,
from the step it entered the cache until the step it is judged. Sinks and the recent window are never
evicted, and a token is judged once: kept tokens stay.

`Evictor` is shared by the layers of one cache. Layer 0's `update` appends the step's tokens (`append`),
each layer's attention adds its probabilities (`observe`), and after the last layer's attention the cache
ends the step (`QuantizedKVCache.end_step`): `decide` makes one plan that every layer applies. Eviction
thus never changes the keys of a step in flight, and the masks of the next step see the new counts.

State: `imp` [u] float32, the importance of the u undecided tokens, aligned with the last u window entries.
Invariant: the plan depends only on `imp` and the counts, so all layers evict the same positions.
"""

from __future__ import annotations

import torch


class Evictor:
    def __init__(self, rate: float, residual: int, block: int):
        self.rate, self.residual, self.block = rate, residual, block
        self.imp: torch.Tensor | None = None

    @property
    def undecided(self) -> int:
        return 0 if self.imp is None else self.imp.shape[0]

    def append(self, layer_idx: int, new_tokens: int, taken_by_sinks: int, device) -> None:
        """Layer 0's update: new tokens enter unjudged with zero importance (minus those the sinks took)."""
        if layer_idx != 0:
            return
        zeros = torch.zeros(new_tokens, device=device)
        imp = zeros if self.imp is None else torch.cat([self.imp, zeros.to(self.imp.device)])
        self.imp = imp[taken_by_sinks:]

    def decide(self) -> tuple[int, torch.Tensor | None]:
        """End of a step: (decided, drop). The oldest `decided` unjudged tokens (whole blocks beyond the
        window) are judged now; `drop` indexes the evicted ones among them."""
        imp = self.imp if self.imp is not None else torch.zeros(0)
        nb = max(0, imp.shape[0] - self.residual) // self.block
        k = round(self.rate * self.block)
        drops = []
        for b in range(nb if k else 0):
            seg = imp[b * self.block:(b + 1) * self.block]
            # lowest importance first; among equals the older token goes (stable order)
            order = torch.sort(seg, stable=True).indices[:k]
            drops.append(order.sort().values + b * self.block)
        self.imp = imp[nb * self.block:]
        return nb * self.block, (torch.cat(drops) if drops else None)

    def observe(self, probs: torch.Tensor) -> None:
        """Add attention probabilities [B, Hq, q, n] of one layer (their last `undecided` columns)."""
        u = self.undecided
        if u:
            self.imp += probs[..., -u:].float().sum(dim=(0, 1, 2)).to(self.imp.device)

    def crop(self, n: int) -> None:
        if n > self.undecided:
            raise ValueError(f"cannot crop {n} tokens: only {self.undecided} are not yet judged for eviction")
        self.imp = self.imp[:self.undecided - n]


def attention_probs(query, key, scaling: float) -> torch.Tensor:
    """Causal attention probabilities [B, Hq, q, n] of the q newest queries over all n keys (GQA aware)."""
    rep = query.shape[1] // key.shape[1]
    k = key.repeat_interleave(rep, dim=1).float()
    scores = (query.float() @ k.transpose(-1, -2)) * scaling
    q, n = scores.shape[-2], scores.shape[-1]
    future = torch.arange(n, device=scores.device)[None] > (n - q + torch.arange(q, device=scores.device))[:, None]
    return torch.softmax(scores.masked_fill(future, float("-inf")), dim=-1)
