"""`ColdCodec`, the lossy cold block codec (container kind COLD_BLOCK): opt-in, `tiers.cold_spec`.

An idle session's block may be stored as `kvstore.quant.cold.cold_state` of its sealed tensors (a lower
spec, e.g. keys 3 bits and values 2 bits over groups of 128) instead of its device codes. What a resume
gets back is the *warm* block, `warm_state(cold_state(block))`: device-format tensors of exactly the
block's layout, a little further from the fp16 KV than the original codes. `ColdCodec.encode` returns that warm
block as `EncodedBlock.tensors`, and the block's content hash is the warm block's, so:

Invariants (beside `kvstore.codec.block_codec`'s):
- `decode(encode(p, i).data, i)` equals the warm block `encode(p, i).tensors` bit for bit (checked on
  decode against the content hash; a mismatch is a ContainerError), so a session resumed from cold blocks is
  exact with respect to that decoded cache, however often it is resumed.
- Lossy with respect to `p`: the error bound is `kvstore.quant.cold`'s (cold step / 2 + device step / 2,
  element-wise). Recomputing the session from its token history gives the original, lossless KV.
- Each block goes through the cold format on its own (cold key groups start at the block's start), so
  `block_tokens` must be a multiple of the cold key group. Sink tensors (block 0) go through
  `kvstore.quant.cold.cold_sinks` (fp32 rounded to bf16; idempotent, so a warm block encodes to itself).
- `warm_tail(tail)` is the session's tail as it is stored next to cold blocks (and so resumed): its sinks
  through `cold_sinks`, its INT8 window codes through `cold_window` at the spec's `cw` bits. Idempotent.
- With `qk` in the cold spec, encoding needs the model's key weight exponents (`BlockContext.key_exps`,
  `kvstore.quant.key_weights`); each block stores its own (`kc_wexp`), so decoding never needs them.

Container: a KV container (kvstore.codec.kv, zstd over stream-transformed tensors) of kind COLD_BLOCK whose
state meta holds `v` (COLD_VERSION; READ_COLD_VERSIONS are read), `cold_spec`, `shape`, `block_tokens`,
`index0` and `content` (hex of the warm block's content hash). Its tensors, family by family (all layers'
key codes, then ...: zstd codes that ~3% smaller than layer after layer):
- a cold family every layer holds at one shape is one tensor "all.<name>" [layers, ...] (v2: a header of
  ~10 shapes instead of ~200, 7 KB less per block); any other is "<layer>.<name>";
- v3: the value families (vc_codes, vc_scale, vc_zero of every layer whose values go cold) are one byte
  tensor VALUES, a payload of the lossless block coder (kvstore.codec.entropy: rANS with contexts, scales
  and zeros predicted from the codes), whose layout follows from the specs and shape (`_value_layout`);
  it codes them ~4% smaller than zstd. v1/v2 blocks hold those families as tensors.
Decoding takes any of these forms, in any order.
"""

from __future__ import annotations

import numpy as np
import torch

from kvstore.codec import entropy
from kvstore.codec.block_codec import BlockCodec, BlockContext, EncodedBlock, content_hash
from kvstore.codec.container import Codec, ContainerError, Kind
from kvstore.codec.kv import decode_kv, encode_kv
from kvstore.config import QuantConfig
from kvstore.layout import SINK_FIELDS, ModelShape, Tensors
from kvstore.quant.cold import (
    COLD_KEPT_FIELDS,
    CONTAINER_BITS,
    ColdSpecError,
    check_specs,
    cold_kept,
    cold_state,
    passes_through,
    warm_state,
)
from kvstore.quant.state import KVState

COLD_VERSION = 3  # 3: values in one rANS payload (VALUES), keys may carry kc_wexp (qk); 2: families stacked
READ_COLD_VERSIONS = (1, 2, 3)  # over layers, sinks through cold_sinks; 1: layer by layer, sinks as is
VALUES = "all.vc_rans"  # v3: every layer's vc_codes, vc_scale, vc_zero coded by kvstore.codec.entropy
STACKED = "all"  # the layer part of a stacked family's name (v2)
COLD_LEVEL = 19  # idle blocks are written once and read rarely: zstd's strongest level pays


def check_cold(quant: QuantConfig, cold: QuantConfig, block_tokens: int, layers: int | None = None) -> None:
    """Raise ColdSpecError (a ValueError) when `cold` cannot store blocks of `quant` caches."""
    check_specs(quant, cold)
    if cold.pre_rope:
        raise ColdSpecError("cold specs with prerope are not supported for stored blocks (use the eval)")
    if block_tokens % cold.key_group:
        raise ColdSpecError(f"block_tokens={block_tokens} must be a multiple of the cold key group "
                            f"{cold.key_group}")
    if layers is not None and cold.layer_bits and len(cold.layer_bits) != layers:
        raise ColdSpecError(f"the cold spec sets bits for {len(cold.layer_bits)} layers; the model has {layers}")


def _stackable(field: str) -> bool:
    return field.startswith(("kc_", "vc_")) or field in ("k_keep", "v_keep")  # cold families, not device names


def _stack(cold_layers: dict[int, dict[str, np.ndarray]]) -> Tensors:
    """The container's tensors, family by family: a cold family that every layer holds at one shape and dtype
    is one tensor "all.<field>" [layers, ...]; any other tensor is "<layer>.<field>", in layer order."""
    layers = sorted(cold_layers)
    out: Tensors = []
    for f in sorted({f for fields in cold_layers.values() for f in fields}):
        arrs = [cold_layers[i].get(f) for i in layers]
        if _stackable(f) and all(a is not None for a in arrs) and len({(a.dtype.str, a.shape) for a in arrs}) == 1:
            out.append((f"{STACKED}.{f}", np.stack(arrs)))
        else:
            out += [(f"{i}.{f}", a) for i, a in zip(layers, arrs) if a is not None]
    return out


def _layers(part: Tensors, layers: int | None = None) -> dict[int, dict[str, np.ndarray]]:
    """Tensors "<layer>.<field>" (and, with `layers`, stacked "all.<field>") by layer and field."""
    out: dict[int, dict[str, np.ndarray]] = {}
    for name, a in part:
        layer, _, field = name.partition(".")
        if layer == STACKED and layers is not None and _stackable(field) and a.ndim and a.shape[0] == layers:
            for i in range(layers):
                out.setdefault(i, {})[field] = a[i]
        elif layer.isdigit():
            out.setdefault(int(layer), {})[field] = a
        else:
            raise ContainerError(f"cold block holds an unexpected tensor {name!r} {list(a.shape)}")
    return out


def _value_layout(quant: QuantConfig, cold: QuantConfig, shape: ModelShape, block_tokens: int):
    """(layout, code bits) of the VALUES payload: the cold value tensors of every layer whose values go cold,
    named as the block coder pairs codes with their scales and zeros ("<layer>.v_codes", ...)."""
    h, d, out, bits = shape.kv_heads, shape.head_dim, [], {}
    gv = min(cold.value_group, d)
    for layer in range(shape.layers):
        if passes_through(quant, cold, "v", layer):
            continue
        c = CONTAINER_BITS[cold.bits_for(layer)[1]]
        out += [(f"{layer}.v_codes", np.dtype(np.uint8), (1, h, block_tokens, d * c // 8)),
                (f"{layer}.v_scale", np.dtype(np.float16), (1, h, block_tokens, d // gv)),
                (f"{layer}.v_zero", np.dtype(np.float16), (1, h, block_tokens, d // gv))]
        bits[f"{layer}.v_codes"] = c
    return out, bits


def _code_values(cold_layers: dict[int, dict[str, np.ndarray]], layout, bits) -> np.ndarray:
    """Take every layer's cold value tensors out of `cold_layers`; their VALUES payload."""
    named = []
    for name, _, _ in layout:
        layer, _, field = name.partition(".")
        named.append((name, cold_layers[int(layer)].pop("vc_" + field[2:])))
    return np.frombuffer(entropy.encode_block(named, bits), np.uint8)


def _decode_values(cold_layers: dict[int, dict[str, np.ndarray]], payload: np.ndarray, layout, bits) -> None:
    """Put the cold value tensors of a VALUES payload (of this `layout`) back into `cold_layers`."""
    if payload.dtype != np.uint8 or payload.ndim != 1:
        raise ContainerError(f"cold block values are {payload.dtype} {list(payload.shape)}, not a byte payload")
    for name, a in entropy.decode_block(payload.tobytes(), layout, bits):
        layer, _, field = name.partition(".")
        cold_layers[int(layer)]["vc_" + field[2:]] = a


def _torch(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a))


def _kept(field: str, a: np.ndarray, cold: QuantConfig) -> np.ndarray:
    """`a` as a cold session keeps it (`cold_kept`): sinks and window codes change, nothing else."""
    return cold_kept(field, _torch(a), cold).numpy() if field in COLD_KEPT_FIELDS else a


def _warm(cold_layers: dict[int, dict[str, np.ndarray]], order: list[tuple[str, np.dtype, tuple]],
          quant: QuantConfig, cold: QuantConfig, shape: ModelShape, start: int) -> Tensors:
    """The device-format block (in `order`, the block layout) from its cold tensors."""
    warm: dict[str, np.ndarray] = {}
    for layer, fields in cold_layers.items():
        sinks = {f: a for f, a in fields.items() if f in SINK_FIELDS}
        c = {f: _torch(a) for f, a in fields.items() if f not in SINK_FIELDS}
        w = warm_state(c, quant, cold, layer, shape.head_dim, position=quant.sinks + start) if c else {}
        warm.update({f"{layer}.{f}": t.contiguous().numpy() for f, t in w.items()})
        warm.update({f"{layer}.{f}": a for f, a in sinks.items()})
    out = []
    for name, dtype, shp in order:
        a = warm.get(name)
        if a is None or a.dtype != dtype or tuple(a.shape) != tuple(shp):
            raise ContainerError(f"cold block does not warm up to the block layout at {name!r}")
        out.append((name, a))
    return out


class ColdCodec(BlockCodec):
    """`spec`: the cold QuantConfig spec blocks are encoded with (decoding reads it from the container)."""

    name = "cold"
    container = (Kind.COLD_BLOCK, Codec.ZSTD_STREAMS)
    lossless = False

    def __init__(self, ctx: BlockContext, spec: str | None = None):
        super().__init__(ctx, spec)
        self.cold = None
        if spec is not None:
            self.cold = QuantConfig.parse(spec)
            check_cold(ctx.quant, self.cold, ctx.block_tokens, ctx.shape.layers)
            want = (ctx.shape.layers, ctx.shape.kv_heads, ctx.shape.head_dim)
            if self.cold.query_keys and (ctx.key_exps is None or tuple(ctx.key_exps.shape) != want):
                raise ColdSpecError(f"cold spec {spec} (qk) needs the model's key weight exponents {list(want)} "
                                    "(kvstore.quant.key_weights)")

    def encode(self, part: Tensors, index: int) -> EncodedBlock:
        if self.cold is None:
            raise ValueError("the cold codec encodes only with a cold spec (tiers.cold_spec)")
        self.check_layout(part, index)
        c, start = self.ctx, index * self.ctx.block_tokens
        quant = c.quant
        cold_layers: dict[int, dict[str, np.ndarray]] = {}
        for layer, fields in _layers(part).items():
            region = {f: _torch(a) for f, a in fields.items() if f not in SINK_FIELDS}
            exps = torch.from_numpy(c.key_exps[layer]) if self.cold.query_keys else None
            cl = cold_state(region, quant, self.cold, layer, c.shape.head_dim, start=start,
                            position=quant.sinks + start, key_exps=exps)
            cold_layers[layer] = {f: t.contiguous().numpy() for f, t in cl.items()}
            cold_layers[layer].update({f: _kept(f, a, self.cold) for f, a in fields.items() if f in SINK_FIELDS})
        warm = _warm(cold_layers, c.layout(index), quant, self.cold, c.shape, start)
        content = content_hash(warm)
        values = _code_values(cold_layers, *_value_layout(quant, self.cold, c.shape, c.block_tokens))
        tensors = _stack(cold_layers) + [(VALUES, values)]
        meta = {"v": COLD_VERSION, "cold_spec": self.cold.spec(), "shape": c.shape.to_json(),
                "block_tokens": c.block_tokens, "index0": index == 0, "content": content.hex()}
        state = KVState(num_tokens=c.block_tokens, quant_spec=quant.spec(), meta=meta, tensors=tensors)
        data = encode_kv(state, model_fingerprint=c.model_fingerprint, level=COLD_LEVEL, codec=self.container[1],
                         kind=self.container[0])
        return EncodedBlock(data, content, warm)

    def warm_tail(self, tail: KVState) -> KVState:
        """The session's tail as stored beside its cold blocks: its sinks and window through `cold_kept`,
        everything else as it is (same names, shapes, dtypes)."""
        if self.cold is None:
            raise ValueError("the cold codec warms tails only with a cold spec (tiers.cold_spec)")
        out = [(name, _kept(name.partition(".")[2], a, self.cold)) for name, a in tail.tensors]
        return KVState(num_tokens=tail.num_tokens, quant_spec=tail.quant_spec, meta=tail.meta, tensors=out)

    def decode(self, data: bytes, index: int, content: bytes | None = None) -> Tensors:
        c = self.ctx
        state = decode_kv(data, model_fingerprint=c.model_fingerprint, kind=Kind.COLD_BLOCK)
        meta = state.meta
        if meta.get("v") not in READ_COLD_VERSIONS:
            raise ContainerError(f"stored cold block has v={meta.get('v')!r}, expected one of {READ_COLD_VERSIONS}")
        want = {"shape": c.shape.to_json(), "block_tokens": c.block_tokens, "index0": index == 0}
        for key, value in want.items():
            if meta.get(key) != value:
                raise ContainerError(f"stored cold block has {key}={meta.get(key)!r}, expected {value!r}")
        if state.quant_spec != c.quant.spec() or not isinstance(meta.get("cold_spec"), str):
            raise ContainerError(f"stored cold block is for {state.quant_spec!r}, expected {c.quant.spec()!r}")
        if not isinstance(meta.get("content"), str) or (content is not None and meta["content"] != content.hex()):
            raise ContainerError("stored cold block has another content hash than the session recorded")
        try:
            cold = QuantConfig.parse(meta["cold_spec"])
            check_cold(c.quant, cold, c.block_tokens, c.shape.layers)
        except ValueError as e:
            raise ContainerError(f"stored cold block has an unusable cold spec: {e}") from None
        values = [a for name, a in state.tensors if name == VALUES]
        cold_layers = _layers([(name, a) for name, a in state.tensors if name != VALUES], c.shape.layers)
        if set(cold_layers) != set(range(c.shape.layers)):
            raise ContainerError("stored cold block does not hold every layer")
        try:
            if values:  # v3
                _decode_values(cold_layers, values[0], *_value_layout(c.quant, cold, c.shape, c.block_tokens))
            warm = _warm(cold_layers, c.layout(index), c.quant, cold, c.shape, index * c.block_tokens)
        except ContainerError:
            raise
        except (KeyError, IndexError, RuntimeError, ValueError, TypeError, ArithmeticError) as e:
            raise ContainerError(f"stored cold block does not decode: {type(e).__name__}: {e}") from None
        if content_hash(warm).hex() != meta["content"]:
            raise ContainerError("cold block warmed up to other bytes than it recorded")
        return warm
