"""RoPE as the model computes it, for storing keys before RoPE (`prerope`).

`Rope.apply(x, start, layer)` rotates keys x [B, H, n, D] to positions start..start+n-1 exactly as the
model's attention does (`x * cos + rotate_half(x) * sin`, with the model's own rotary module making
cos/sin); `Rope.invert` undoes it. Keys stored pre-RoPE have no position-dependent rotation mixed into
their channels, so per-channel groups see each channel's own distribution.

Invariant: `invert(apply(x, s, l), s, l) == x` up to float32 rounding (RoPE is a rotation, scaled by the
model's `attention_scaling`, which `invert` divides out).
"""

from __future__ import annotations

import inspect

import torch

_UNSUPPORTED_TYPES = {"dynamic", "longrope"}  # their frequencies depend on the sequence length seen


class RopeUnavailable(ValueError):
    """The model has no RoPE this module can reproduce."""


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), dim=-1)


class Rope:
    def __init__(self, rotary: torch.nn.Module, layer_types: list[str] | None):
        self.rotary = rotary
        self.layer_types = layer_types
        self._per_layer = "layer_type" in inspect.signature(rotary.forward).parameters

    @classmethod
    def from_model(cls, model) -> Rope:
        text = model.config.get_text_config(decoder=True)
        base = getattr(model, "model", model)
        rotary = getattr(base, "rotary_emb", None) or getattr(getattr(base, "language_model", None), "rotary_emb", None)
        if rotary is None:
            raise RopeUnavailable(f"{text.model_type} has no rotary position embedding: prerope does not apply")
        params = getattr(text, "rope_parameters", None) or getattr(text, "rope_scaling", None) or {}
        kinds = {p.get("rope_type", "default") for p in (params.values() if "rope_type" not in params else [params])
                 if isinstance(p, dict)}
        if kinds & _UNSUPPORTED_TYPES:
            raise RopeUnavailable(f"rope types {sorted(kinds & _UNSUPPORTED_TYPES)} depend on sequence length: "
                                  "prerope is not supported")
        return cls(rotary, getattr(text, "layer_types", None))

    def cos_sin(self, start: int, n: int, layer: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [1, 1, n, D] float32 for positions start..start+n-1 of one layer."""
        pos = torch.arange(start, start + n, device=device)[None]
        x = torch.empty(0, dtype=torch.float32, device=device)
        args = (x, pos, self.layer_types[layer]) if self._per_layer else (x, pos)
        cos, sin = self.rotary(*args)
        return cos.float()[:, None], sin.float()[:, None]

    def apply(self, x: torch.Tensor, start: int, layer: int) -> torch.Tensor:
        cos, sin = self.cos_sin(start, x.shape[-2], layer, x.device)
        xf = x.float()
        return xf * cos + _rotate_half(xf) * sin

    def invert(self, x: torch.Tensor, start: int, layer: int) -> torch.Tensor:
        cos, sin = self.cos_sin(start, x.shape[-2], layer, x.device)
        xf = x.float()
        return (xf * cos - _rotate_half(xf) * sin) / (cos * cos + sin * sin)
