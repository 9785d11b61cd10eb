"""`prepack_linears`: a CPU model's linear layers on oneDNN's prepacked-weight GEMM.

Why: torch's `F.linear` on CPU hands the weight to its GEMM in the plain layout, which reorders (packs) it
on every call; for the small products of a decode pass that costs as much as the product. Measured (torch
2.13, AMX-BF16, 2 cores, SmolLM2-135M shapes; docs/BENCHMARKS.md, "Prepacked weights"):
- bf16, one row: 576x576 47-50 against 27 us prepacked; 1536x576 80 against 38 us; the 49152x576 lm_head
  2.5 against 1.2 ms. At 16 rows, 43-110 against 31-52 us. bf16 prepacks every product (`BF16`), and its
  plain weights are dropped: memory unchanged but for a tied lm_head's prepacked copy.
- fp32 at 16 rows: 576x576 78 against 65 us; 1536x576 240 against 183 us; 576x1536 303 against 207 us;
  lm_head 10.6 against 7.2 ms; a 512-row prefill pass of the model 670 against 557 ms. At one row oneDNN's
  prepacked fp32 product is ~3x slower than `F.linear`'s (35 against 14 us at 576x576), so fp32 (`FP32`)
  keeps `F.linear` on the plain weight for one row and prepacks for more: both weights are kept (~+0.5 GB
  for SmolLM2-135M).

Invariants:
- A prepacked layer computes `x @ W.T + b` with one kernel per input row count (`F.linear` at most
  `plain_rows` rows, the prepacked primitive above); given the same rows it returns the same bits on every
  call (no state besides the weights, prepacked once). Batch invariance at the worker's bucket shapes and
  packed prefill sizes is checked at start by `services/worker/batching.py`, whose probes run through
  these layers; a size that fails is refused as for any kernel.
- Prepacking replaces only `nn.Linear` modules (no subclasses) and keeps their names (hooks and
  `named_modules` see the same tree). The model's fingerprint (`ModelRunner`) is computed from the plain
  weights before prepacking and names `Prepacking.kernel`, so KV stored under one kernel is never loaded
  under another (it is rebuilt from the session's history).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass(frozen=True)
class Prepacking:
    """How a model's linear layers run: `kernel` names it in the model fingerprint; products of at most
    `plain_rows` rows keep `F.linear` on the plain weight (kept beside the prepacked one)."""

    kernel: str
    plain_rows: int


BF16 = Prepacking("onednn-prepacked", 0)
FP32 = Prepacking("onednn-prepacked-above-1-row", 1)  # one row: F.linear's is ~3x faster than oneDNN's


def prepacking_for(model: nn.Module) -> Prepacking | None:
    """The prepacking for this model, or None (`F.linear` stays): CPU models with a torch build that has
    oneDNN; bfloat16 only on CPUs with native bf16 products (AVX512-BF16 or AMX); float16 never."""
    p = next(model.parameters())
    if p.device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return None
    if p.dtype == torch.float32:
        return FP32
    if p.dtype == torch.bfloat16 and (torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()):
        return BF16
    return None


class PrepackedLinear(nn.Module):
    """`nn.Linear`'s product on a weight prepacked once for oneDNN (CPU); `F.linear` on the plain weight for
    at most `plain_rows` rows."""

    def __init__(self, linear: nn.Linear, keep_weight: bool, plain_rows: int = 0):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        w = linear.weight.detach()
        self.packed = torch.ops.mkldnn._reorder_linear_weight(w.contiguous(), 16)
        self.bias = linear.bias
        self.plain_rows = plain_rows
        if keep_weight or plain_rows:  # shared with another module (a tied lm_head), or the small-row path's
            self.weight = linear.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        if rows.shape[0] <= self.plain_rows:
            return F.linear(x, self.weight, self.bias)
        if not rows.is_contiguous():
            rows = rows.contiguous()
        y = torch.ops.mkldnn._linear_pointwise(rows, self.packed, self.bias, "none", [], "")
        return y.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def prepack_linears(model: nn.Module, plain_rows: int = 0) -> int:
    """Replace every plain `nn.Linear` of `model` by a `PrepackedLinear` (`plain_rows`: see
    `Prepacking`); -> how many."""
    owners: dict[int, int] = {}
    for m in model.modules():
        for p in m.parameters(recurse=False):
            owners[id(p)] = owners.get(id(p), 0) + 1
    n = 0
    with torch.no_grad():
        for parent in list(model.modules()):
            for name, child in list(parent.named_children()):
                if type(child) is nn.Linear:
                    setattr(parent, name, PrepackedLinear(child, owners[id(child.weight)] > 1, plain_rows))
                    n += 1
    return n
