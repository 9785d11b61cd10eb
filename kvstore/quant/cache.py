"""`QuantizedKVCache`: a transformers `Cache` whose layers hold bit-packed quantized KV.

Works with `model(..., past_key_values=cache)` and `model.generate(..., past_key_values=cache)`.
Export to a `KVState` (numpy, device-free) and import back are exact, so a session that leaves the
device and comes back continues token for token as if it never left.
"""

from __future__ import annotations

import numpy as np
import torch
from transformers.cache_utils import Cache, get_layer_types_and_kwargs

from kvstore.config import QuantConfig
from kvstore.quant.evict import Evictor
from kvstore.quant.layer import QuantizedKVLayer
from kvstore.quant.rope import Rope, RopeUnavailable
from kvstore.quant.state import KVState

# numpy has no bfloat16: such tensors travel as their raw 16-bit patterns.
_BITCAST = {torch.bfloat16: torch.int16}
_DTYPES = {str(d): d for d in (torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.uint8, torch.int8,
                               torch.int16, torch.int32)}  # int8: INT8 window codes; int16/int32: outlier indices


class UnsupportedModelError(ValueError):
    """The model's attention layout cannot be served by `QuantizedKVCache`."""


SUPPORTED_LAYER_TYPES = {"full_attention", "sliding_attention"}


def check_model_supported(model_config) -> int:
    """Return the number of KV layers, or raise UnsupportedModelError with the reason.

    Sliding-window layers keep their whole history and rely on the model's sliding mask (the cache
    reports every layer as full, so the mask is built over absolute positions); linear-attention,
    chunked or shared-KV layouts are refused."""
    text = model_config.get_text_config(decoder=True)
    if getattr(model_config, "is_encoder_decoder", False):
        raise UnsupportedModelError(f"{model_config.model_type}: encoder-decoder models are not supported")
    layer_types, _ = get_layer_types_and_kwargs(text)
    bad = sorted(set(layer_types) - SUPPORTED_LAYER_TYPES)
    if bad:
        raise UnsupportedModelError(
            f"{text.model_type}: layer types {bad} are not supported by the quantized cache "
            f"(supported: {sorted(SUPPORTED_LAYER_TYPES)})"
        )
    if getattr(text, "num_kv_shared_layers", 0):
        raise UnsupportedModelError(f"{text.model_type}: layers sharing KV are not supported by the quantized cache")
    return len(layer_types)


def check_spec_supported(model_config, quant: QuantConfig) -> None:
    """Raise UnsupportedModelError when `quant` needs what the model's layout lacks."""
    layer_types, _ = get_layer_types_and_kwargs(model_config.get_text_config(decoder=True))
    if quant.evict and "sliding_attention" in layer_types:
        raise UnsupportedModelError("token eviction (ev) is not supported with sliding-window layers: "
                                    "their masks need every position")


def rope_for(model, quant: QuantConfig) -> Rope | None:
    """The model's RoPE when `quant` stores keys before RoPE, else None; raises when it cannot."""
    if not quant.pre_rope:
        return None
    try:
        return Rope.from_model(model)
    except RopeUnavailable as e:
        raise UnsupportedModelError(str(e)) from None


def _to_numpy(t: torch.Tensor) -> np.ndarray:
    t = t.detach().contiguous().cpu()
    if t.dtype in _BITCAST:
        t = t.view(_BITCAST[t.dtype])
    return t.numpy().copy()


def _to_torch(a: np.ndarray, dtype: torch.dtype, device) -> torch.Tensor:
    t = torch.from_numpy(np.ascontiguousarray(a))
    if dtype in _BITCAST:
        t = t.view(dtype)
    return t.to(device)


class QuantizedKVCache(Cache):
    """One `QuantizedKVLayer` per decoder layer, all sharing one `QuantConfig`."""

    def __init__(self, quant: QuantConfig, num_layers: int, rope: Rope | None = None):
        if quant.layer_bits and len(quant.layer_bits) != num_layers:
            raise UnsupportedModelError(
                f"the KV spec sets bits for {len(quant.layer_bits)} layers; the model has {num_layers}")
        self.evictor = Evictor(quant.evict, quant.residual, quant.key_group) if quant.evict else None
        super().__init__(layers=[QuantizedKVLayer(quant, i, rope, self.evictor) for i in range(num_layers)])
        self.quant = quant
        self.rope = rope
        self.probe: list[tuple[int, float, float]] | None = None  # set to [] to probe the next step's quality

    @classmethod
    def for_model(cls, model, quant: QuantConfig) -> QuantizedKVCache:
        check_spec_supported(model.config, quant)
        return cls(quant, check_model_supported(model.config), rope_for(model, quant))

    def end_step(self) -> None:
        """After a forward pass's last attention: apply the eviction plan to every layer (no-op without one)."""
        if self.evictor is not None:
            decided, drop = self.evictor.decide()
            for layer in self.layers:
                if layer.is_initialized:
                    layer.evict(decided, drop)

    def seal_all(self) -> None:
        """Seal every layer's whole window groups now (see `QuantizedKVLayer.seal_all`)."""
        for layer in self.layers:
            layer.seal_all()

    def device_bytes(self) -> int:
        """Device memory held by every layer, measured from tensor storages (decode views included)."""
        return sum(layer.device_bytes() for layer in self.layers)

    def state_bytes(self) -> int:
        """Device memory of the cache's state alone: what it holds between calls (no decode views)."""
        return sum(layer.state_bytes() for layer in self.layers)

    def drop_views(self) -> None:
        """Free every layer's decode view (the session's call ended); the state is unchanged."""
        for layer in self.layers:
            layer.drop_view()

    def export_state(self) -> KVState:
        """Copy the cache to host memory as a `KVState` (numpy arrays, model dtype recorded)."""
        tensors = [(name, _to_numpy(t)) for name, t in self._named_torch()]
        meta = {
            "num_layers": len(self.layers),
            "layer_tokens": [layer.num_tokens for layer in self.layers],
            "layer_staged": [layer.n_staged for layer in self.layers],
            "layer_evicted": [layer.n_evicted for layer in self.layers],
            "layer_forced": [layer.forced for layer in self.layers],
            "layer_dtypes": [str(layer.dtype) if layer.is_initialized else "" for layer in self.layers],
            "tensor_dtypes": {name: str(t.dtype) for name, t in self._named_torch()},
        }
        return KVState(num_tokens=self.get_seq_length(), quant_spec=self.quant.spec(), meta=meta, tensors=tensors)

    def _named_torch(self):
        for i, layer in enumerate(self.layers):
            for name, t in layer.tensors().items():
                yield f"{i}.{name}", t
        if self.evictor is not None and self.evictor.imp is not None:
            yield "evict.imp", self.evictor.imp

    @classmethod
    def from_state(cls, state: KVState, device: torch.device | str = "cpu", rope: Rope | None = None) -> QuantizedKVCache:
        """Rebuild a cache from `export_state()` output; tensors are bit-identical to the exported ones.

        `rope` is the model's (`rope_for`), needed when the spec stores keys before RoPE."""
        quant = QuantConfig.parse(state.quant_spec)
        meta = state.meta
        n_layers = int(meta["num_layers"])
        cache = cls(quant, n_layers, rope)
        per_layer: list[dict[str, torch.Tensor]] = [{} for _ in range(n_layers)]
        tdt = meta["tensor_dtypes"]
        for name, arr in state.tensors:
            idx, _, field = name.partition(".")
            t = _to_torch(arr, _DTYPES[tdt[name]], device)
            if name == "evict.imp" and cache.evictor is not None:
                cache.evictor.imp = t
            else:
                per_layer[int(idx)][field] = t
        for i in range(n_layers):
            dtype = _DTYPES.get(meta["layer_dtypes"][i], torch.float32)
            cache.layers[i] = QuantizedKVLayer.from_tensors(
                quant, int(meta["layer_tokens"][i]), per_layer[i], dtype, layer_idx=i, rope=rope,
                evictor=cache.evictor, n_staged=int(meta.get("layer_staged", [0] * n_layers)[i]),
                n_evicted=int(meta.get("layer_evicted", [0] * n_layers)[i]),
                forced=int(meta.get("layer_forced", [0] * n_layers)[i]))
        if cache.get_seq_length() != state.num_tokens:
            raise ValueError(f"state claims {state.num_tokens} tokens, layers hold {cache.get_seq_length()}")
        return cache
