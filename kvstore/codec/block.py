"""`RansCtxCodec`, the lossless block codec (container kind BLOCK, codec RANS_CTX): what every session stores.

Container meta (canonical JSON):
    v               BLOCK_VERSION
    fingerprint     model fingerprint (str)
    quant_spec      QuantConfig.spec() of the cache the block was cut from
    shape           ModelShape.to_json(): layers, kv_heads, head_dim, dtype
    block_tokens    tokens per block
    index0          true for block 0 (which also holds the sink tensors)
    content         hex of `content_hash(tensors)`: what dedup compares
    raw_bytes       bytes of the block's tensors as held in memory

The payload is `kvstore.codec.entropy`'s: the codes rANS-coded with previous-token contexts, scales and
zeros predicted from decoded neighbours, side tables in a zstd frame. The tensors' names, dtypes and shapes
are not stored: `kvstore.layout.layout` predicts them from the header, and the payload must fit that layout
exactly.

Invariants (beside `kvstore.codec.block_codec`'s):
- Lossless: `decode(encode(t, i).data, i)` returns `t` bit for bit, in layout order.
- Anything malformed, truncated, for another model/spec, or not matching its layout raises ContainerError.
"""

from __future__ import annotations

import functools

from kvstore.codec import entropy
from kvstore.codec.block_codec import BlockCodec, EncodedBlock, content_hash
from kvstore.codec.container import Codec, ContainerError, Kind, pack_container, unpack_container
from kvstore.config import QuantConfig
from kvstore.layout import ModelShape, Tensors, layout_bytes

BLOCK_VERSION = 1
_META_TYPES = {"v": int, "fingerprint": str, "quant_spec": str, "shape": dict, "block_tokens": int, "index0": bool,
               "content": str, "raw_bytes": int}


@functools.lru_cache(maxsize=16)
def code_bits(quant: QuantConfig, shape: ModelShape) -> dict[str, int]:
    """The code width of every `*_codes` tensor of a block."""
    out = {}
    for layer in range(shape.layers):
        kb, vb = quant.bits_for(layer)
        out.update({f"{layer}.{side}_codes": b for side, b in (("k", kb), ("v", vb)) if b != 16})
    return out


class RansCtxCodec(BlockCodec):
    name = "rans-ctx"
    container = (Kind.BLOCK, Codec.RANS_CTX)
    lossless = True

    def encode(self, part: Tensors, index: int) -> EncodedBlock:
        self.check_layout(part, index)
        c = self.ctx
        content = content_hash(part)
        meta = {"v": BLOCK_VERSION, "fingerprint": c.model_fingerprint, "quant_spec": c.quant.spec(),
                "shape": c.shape.to_json(), "block_tokens": c.block_tokens, "index0": index == 0,
                "content": content.hex(), "raw_bytes": sum(a.nbytes for _, a in part)}
        payload = entropy.encode_block(part, code_bits(c.quant, c.shape))
        return EncodedBlock(pack_container(*self.container, meta, payload), content, part)

    def decode(self, data: bytes, index: int, content: bytes | None = None) -> Tensors:
        c = self.ctx
        _, codec, meta, payload = unpack_container(data, expect_kind=Kind.BLOCK)
        for key, typ in _META_TYPES.items():
            if not isinstance(meta.get(key), typ) or (typ is int and isinstance(meta[key], bool)):
                raise ContainerError(f"block header is missing or has a bad field {key!r}")
        if meta["v"] != BLOCK_VERSION:
            raise ContainerError(f"unsupported block version {meta['v']} (this build reads {BLOCK_VERSION})")
        if codec != Codec.RANS_CTX:
            raise ContainerError(f"unsupported block codec {codec.name}")
        want = {"fingerprint": c.model_fingerprint, "quant_spec": c.quant.spec(), "shape": c.shape.to_json(),
                "block_tokens": c.block_tokens, "index0": index == 0}
        for key, value in want.items():
            if meta[key] != value:
                raise ContainerError(f"stored block has {key}={meta[key]!r}, expected {value!r}")
        if content is not None and meta["content"] != content.hex():
            raise ContainerError("stored block has another content hash than the session recorded")
        if meta["raw_bytes"] != layout_bytes(c.quant, c.shape, c.block_tokens, index):
            raise ContainerError(f"block claims {meta['raw_bytes']} bytes of tensors, its layout holds another size")
        return entropy.decode_block(payload, c.layout(index), code_bits(c.quant, c.shape),
                                    verified=True)  # unpack_container checked the checksum over these bytes
