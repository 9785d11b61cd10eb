"""`prepack_linears`: a bfloat16 CPU model's linear layers on oneDNN's prepacked-weight GEMM.

Why: torch's bf16 `F.linear` on CPU hands the weight to oneDNN in its plain layout, and oneDNN reorders it
into its blocked layout on every call; for the small products of a decode pass the reorder costs as much
as the product. Measured (torch 2.13, AMX-BF16, 2 cores, SmolLM2-135M shapes; docs/BENCHMARKS.md,
"Prepacked bf16 weights"): one row, 576x576 47-50 against 27 us prepacked, 1536x576 80 against 38 us, the
49152x576 lm_head 2.5 against 1.2 ms; 16 rows, 43-110 against 31-52 us. A dense one-row pass of the model
drops from ~44 to ~34 ms, a 16-row pass from ~46 to ~39 ms; 512-row prefill passes gain nothing
measurable. The plain weights are dropped, so memory is unchanged but for a tied lm_head's prepacked copy.

fp32 keeps `F.linear` (`KERNEL` is bf16's only): oneDNN's prepacked fp32 product is ~3x slower at one row,
and prepacking only the larger products (keeping both weights, +0.5 GB) gained 7% at 16 sessions in the
engine and nothing measurable over gRPC.

Invariants:
- A prepacked layer computes `x @ W.T + b` with one oneDNN primitive per input row count; given the same
  rows it returns the same bits on every call (no state besides the weight, prepacked once). Batch
  invariance at the worker's bucket shapes and packed prefill sizes is checked at start by
  `services/worker/batching.py`, whose probes run through these layers; a size that fails is refused as
  for any kernel.
- Prepacking replaces only `nn.Linear` modules (no subclasses) and keeps their names (hooks and
  `named_modules` see the same tree). The model's fingerprint (`ModelRunner`) is computed from the plain
  weights before prepacking and names `KERNEL`, so KV stored under one kernel is never loaded under the
  other (it is rebuilt from the session's history).
"""

from __future__ import annotations

import torch
import torch.nn as nn

KERNEL = "onednn-prepacked"  # what the model fingerprint records for prepacked linear layers


def native_bf16_cpu() -> bool:
    """Whether this CPU multiplies bf16 natively (AVX512-BF16 or AMX) and torch has oneDNN to use it."""
    return torch.backends.mkldnn.is_available() and (torch.cpu._is_avx512_bf16_supported()
                                                      or torch.cpu._is_amx_tile_supported())


def can_prepack(model: nn.Module) -> bool:
    """Whether `prepack_linears` applies: a bfloat16 model on the CPU, a torch build with oneDNN, and a CPU with
    native bf16 products (AVX512-BF16 or AMX); elsewhere `F.linear` stays."""
    p = next(model.parameters())
    return p.dtype == torch.bfloat16 and p.device.type == "cpu" and native_bf16_cpu()


class PrepackedLinear(nn.Module):
    """`nn.Linear`'s product on a weight prepacked once for oneDNN (bf16, CPU)."""

    def __init__(self, linear: nn.Linear, keep_weight: bool):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.packed = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach().contiguous(), 16)
        self.bias = linear.bias
        if keep_weight:  # shared with another module (a tied lm_head): free to keep, and callers read it
            self.weight = linear.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features).contiguous()  # (a no-op when it already is)
        y = torch.ops.mkldnn._linear_pointwise(rows, self.packed, self.bias, "none", [], "")
        return y.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def prepack_linears(model: nn.Module) -> int:
    """Replace every plain `nn.Linear` of `model` by a `PrepackedLinear` (see `can_prepack`); -> how many."""
    owners: dict[int, int] = {}
    for m in model.modules():
        for p in m.parameters(recurse=False):
            owners[id(p)] = owners.get(id(p), 0) + 1
    n = 0
    with torch.no_grad():
        for parent in list(model.modules()):
            for name, child in list(parent.named_children()):
                if type(child) is nn.Linear:
                    setattr(parent, name, PrepackedLinear(child, keep_weight=owners[id(child.weight)] > 1))
                    n += 1
    return n
