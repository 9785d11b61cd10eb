"""`QuantizedKVLayer`: one attention layer's KV, held as bit-packed codes plus a full-precision window.

Layout (KIVI): keys are quantized per channel in groups of `key_group` tokens along the token axis;
values per token in groups of `value_group` elements along head_dim.

State, for a layer holding `n` tokens:
    sealed region: `n_sealed` tokens, quantized and packed
        k_codes [B, H, n_sealed, packed(D)] uint8   k_scale/k_zero [B, H, n_sealed / key_group, D] fp16
        v_codes [B, H, n_sealed, packed(D)] uint8   v_scale/v_zero [B, H, n_sealed, D / value_group] fp16
      (a side with 16 bits keeps its sealed tokens as a plain [B, H, n_sealed, D] tensor instead)
    sinks: the first `n_sink = min(n, sinks)` tokens in the model dtype, k_sink/v_sink [B, H, n_sink, D]
    sealed region: the next `n_sealed` tokens, laid out as above
    window: the last `n - n_sink - n_sealed` tokens in the model dtype, k_win/v_win

With `rotate`, sealed tokens are quantized in the Hadamard-rotated basis of head_dim and rotated back
when read, so attention always sees the original basis.

Invariants:
- `n_sealed == floor(max(0, n - n_sink - residual) / key_group) * key_group` after every `update`: the state is a
  function of the token positions alone, never of how the tokens were chunked into forward passes.
- A key group is sealed only when it is full and wholly outside the recent window.
- Export then import gives bit-identical tensors (`export_tensors` / `from_tensors`).
"""

from __future__ import annotations

import torch
from transformers.cache_utils import CacheLayerMixin

from kvstore.config import QuantConfig
from kvstore.quant.pack import pack, unpack
from kvstore.quant.quantize import dequantize, quantize
from kvstore.quant.rotation import hadamard, hadamard_matrix

_SIDES = ("k", "v")


class QuantizedKVLayer(CacheLayerMixin):
    is_sliding = False
    is_croppable = True

    def __init__(self, config: QuantConfig):
        super().__init__()
        self.config = config
        self.num_tokens = 0
        self.n_sealed = 0
        self.sealed: dict[str, torch.Tensor] = {}  # name -> tensor, names as in the module docstring
        self.head_dim = 0

    # ---- transformers Cache layer protocol -------------------------------------------------
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.head_dim = key_states.shape[-1]
        if self.config.value_bits != 16 and self.head_dim % self._value_group:
            raise ValueError(
                f"value_group={self.config.value_group} does not divide head_dim={self.head_dim}"
            )
        if self.config.rotate:
            hadamard_matrix(self.head_dim)  # raises for a head_dim that is not a power of two
        empty = key_states[..., :0, :]
        self.keys, self.values = empty.clone(), empty.clone()  # the full-precision window
        self.is_initialized = True

    @property
    def _value_group(self) -> int:
        return min(self.config.value_group, self.head_dim)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Append [B, H, q, D] keys/values; return all keys/values [B, H, n, D] for attention."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.keys = torch.cat([self.keys, key_states], dim=-2)
        self.values = torch.cat([self.values, value_states], dim=-2)
        self.num_tokens += key_states.shape[-2]
        self._take_sinks()
        self._seal()
        if self.n_sealed == 0 and self.n_sink == 0:
            return self.keys, self.values
        k_old, v_old = self.dequantized_sealed()
        return torch.cat([k_old, self.keys], dim=-2), torch.cat([v_old, self.values], dim=-2)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.num_tokens + query_length, 0

    def get_seq_length(self) -> int:
        return self.num_tokens

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.keys = self.values = None
        self.sealed = {}
        self.num_tokens = self.n_sealed = 0
        self.is_initialized = False

    def crop(self, tokens_to_remove: int) -> None:
        """Drop the last `-tokens_to_remove` tokens; only tokens still in the full-precision window can go."""
        if tokens_to_remove > 0:
            raise ValueError("crop takes a negative count of tokens to remove")
        n = -tokens_to_remove
        if n == 0 or not self.is_initialized:
            return
        if n > self.keys.shape[-2]:
            raise ValueError(f"cannot crop {n} tokens: only {self.keys.shape[-2]} are unsealed")
        self.keys = self.keys[..., :-n, :].clone()
        self.values = self.values[..., :-n, :].clone()
        self.num_tokens -= n

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        raise NotImplementedError("QuantizedKVLayer does not support beam search")

    # ---- sinks and sealing ------------------------------------------------------------------------
    @property
    def n_sink(self) -> int:
        return self.sealed["k_sink"].shape[-2] if "k_sink" in self.sealed else 0

    def _take_sinks(self) -> None:
        """Move the first tokens into the sink region until it holds `sinks` tokens (nothing is sealed before)."""
        take = min(self.config.sinks - self.n_sink, self.keys.shape[-2])
        if take <= 0:
            return
        for side, win in (("k", self.keys), ("v", self.values)):
            head = win[..., :take, :]
            name = f"{side}_sink"
            self.sealed[name] = head.clone() if name not in self.sealed else torch.cat([self.sealed[name], head], -2)
        self.keys, self.values = self.keys[..., take:, :].clone(), self.values[..., take:, :].clone()

    def _seal(self) -> None:
        cfg = self.config
        target = max(0, self.num_tokens - self.n_sink - cfg.residual) // cfg.key_group * cfg.key_group
        if target <= self.n_sealed:
            return
        m = target - self.n_sealed  # tokens to move from the window into the sealed region
        new = {}
        for side, x, bits in (("k", self.keys[..., :m, :], cfg.key_bits), ("v", self.values[..., :m, :], cfg.value_bits)):
            if bits == 16:
                new[f"{side}_fp"] = x.contiguous()
                continue
            group, dim = (cfg.key_group, -2) if side == "k" else (self._value_group, -1)
            codes, scale, zero = quantize(hadamard(x) if cfg.rotate else x, bits, group, dim)
            new[f"{side}_codes"] = pack(codes, bits)
            new[f"{side}_scale"], new[f"{side}_zero"] = scale, zero
        for name, t in new.items():
            axis = -2  # every sealed tensor grows along its token (or token-group) axis
            self.sealed[name] = t if name not in self.sealed else torch.cat([self.sealed[name], t], dim=axis)
        self.keys = self.keys[..., m:, :].clone()  # clone: do not keep the old window's storage alive
        self.values = self.values[..., m:, :].clone()
        self.n_sealed = target

    def dequantized_sealed(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Sinks and sealed region as [B, H, n_sink + n_sealed, D] tensors in the model dtype."""
        out = []
        for side in _SIDES:
            parts = [self.sealed[f"{side}_sink"]] if f"{side}_sink" in self.sealed else []
            if self.n_sealed:
                parts.append(self._read_sealed(side))
            out.append(parts[0] if len(parts) == 1 else torch.cat(parts, dim=-2))
        return out[0], out[1]

    def _read_sealed(self, side: str) -> torch.Tensor:
        """One side's sealed region, dequantized (and rotated back) to [B, H, n_sealed, D] in the model dtype."""
        s = self.sealed
        if f"{side}_fp" in s:
            return s[f"{side}_fp"]
        bits = self.config.key_bits if side == "k" else self.config.value_bits
        codes = unpack(s[f"{side}_codes"], bits, self.head_dim)
        group, dim = (self.config.key_group, -2) if side == "k" else (self._value_group, -1)
        x = dequantize(codes, s[f"{side}_scale"], s[f"{side}_zero"], group, dim, torch.float32)
        return (hadamard(x) if self.config.rotate else x).to(self.dtype)  # the rotation is its own inverse

    # ---- accounting and export -----------------------------------------------------------------
    def tensors(self) -> dict[str, torch.Tensor]:
        """Every tensor this layer holds, by name (sealed region and window)."""
        if not self.is_initialized:
            return {}
        return {**self.sealed, "k_win": self.keys, "v_win": self.values}

    def device_bytes(self) -> int:
        """Bytes of device memory held, measured from the tensors' storages (not computed on paper)."""
        return sum(t.untyped_storage().nbytes() for t in self.tensors().values())

    @classmethod
    def from_tensors(
        cls, config: QuantConfig, num_tokens: int, tensors: dict[str, torch.Tensor], dtype: torch.dtype
    ) -> "QuantizedKVLayer":
        """Rebuild a layer from `tensors()` output; the inverse of export, bit for bit."""
        layer = cls(config)
        if not tensors:
            return layer
        layer.keys, layer.values = tensors["k_win"], tensors["v_win"]
        layer.dtype, layer.device = dtype, layer.keys.device
        layer.head_dim = layer.keys.shape[-1]
        layer.sealed = {n: t for n, t in tensors.items() if n not in ("k_win", "v_win")}
        layer.num_tokens = num_tokens
        n_sink = layer.n_sink
        layer.n_sealed = num_tokens - n_sink - layer.keys.shape[-2]
        expected = max(0, num_tokens - n_sink - config.residual) // config.key_group * config.key_group
        if n_sink != min(num_tokens, config.sinks) or layer.n_sealed != expected:
            raise ValueError(f"layer state holds {n_sink} sink and {layer.n_sealed} sealed tokens; "
                             f"the config implies {min(num_tokens, config.sinks)} and {expected}")
        layer.is_initialized = True
        return layer
