"""A stored KV block: its tensors, coded losslessly, in a versioned checksummed container (kind BLOCK).

Container meta (canonical JSON):
    v               BLOCK_VERSION
    fingerprint     model fingerprint (str)
    quant_spec      QuantConfig.spec() of the cache the block was cut from
    shape           ModelShape.to_json(): layers, kv_heads, head_dim, dtype
    block_tokens    tokens per block
    index0          true for block 0 (which also holds the sink tensors)
    content         hex of `content_hash(tensors)`: what dedup compares
    raw_bytes       bytes of the block's tensors as held in memory

The payload is `kvstore.codec.entropy`'s (codec RANS_CTX): the codes rANS-coded with previous-token
contexts, scales and zeros predicted from decoded neighbours, side tables in a zstd frame. The tensors'
names, dtypes and shapes are not stored: `kvstore.layout.layout` predicts them from the header, and
the payload must fit that layout exactly.

Invariants:
- `decode_block(encode_block(t, ...).data, ...)` returns `t` bit for bit, in layout order.
- `content_hash` is a function of the tensors' names, dtypes, shapes and bytes only (not of the coder), so
  two blocks with equal content hashes are interchangeable.
- Anything malformed, truncated, for another model/spec, or not matching its layout raises ContainerError.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from kvstore.codec import entropy
from kvstore.codec.container import Codec, ContainerError, Kind, pack_container, unpack_container
from kvstore.config import QuantConfig
from kvstore.digest import hash_fields
from kvstore.layout import ModelShape, Tensors, layout, layout_bytes

BLOCK_VERSION = 1


@dataclass(frozen=True)
class EncodedBlock:
    data: bytes  # the container
    content: bytes  # content hash (32 bytes)
    raw_bytes: int  # bytes of the block's tensors as held in memory


def content_hash(tensors: Tensors) -> bytes:
    """blake2b-256 over every tensor's name, dtype, shape and little-endian bytes, in order."""
    fields: list = []
    for name, a in tensors:
        a = np.ascontiguousarray(a, dtype=a.dtype.newbyteorder("<"))
        fields += [name, a.dtype.name, ",".join(map(str, a.shape)), a.tobytes()]
    return hash_fields(fields, person=b"kvstash-blkdata")


def encode_block(tensors: Tensors, *, quant: QuantConfig, shape: ModelShape, block_tokens: int, index: int,
                 model_fingerprint: str) -> EncodedBlock:
    expected = layout(quant, shape, block_tokens, index)
    got = [(n, a.dtype, a.shape) for n, a in tensors]
    if got != expected:
        raise ContainerError(f"block tensors do not fit the layout of {quant.spec()}: {got[:2]} vs {expected[:2]}")
    content = content_hash(tensors)
    raw = sum(a.nbytes for _, a in tensors)
    meta = {"v": BLOCK_VERSION, "fingerprint": model_fingerprint, "quant_spec": quant.spec(), "shape": shape.to_json(),
            "block_tokens": block_tokens, "index0": index == 0, "content": content.hex(), "raw_bytes": raw}
    payload = entropy.encode_block(tensors, code_bits(quant, shape))
    return EncodedBlock(pack_container(Kind.BLOCK, Codec.RANS_CTX, meta, payload), content, raw)


@functools.lru_cache(maxsize=16)
def code_bits(quant: QuantConfig, shape: ModelShape) -> dict[str, int]:
    """The code width of every `*_codes` tensor of a block."""
    out = {}
    for layer in range(shape.layers):
        kb, vb = quant.bits_for(layer)
        out.update({f"{layer}.{side}_codes": b for side, b in (("k", kb), ("v", vb)) if b != 16})
    return out


def block_header(data: bytes) -> dict:
    """The validated container meta of a stored block (checksum checked, payload not decoded)."""
    return _open(data)[0]


def _open(data: bytes) -> tuple[dict, bytes]:
    _, codec, meta, payload = unpack_container(data, expect_kind=Kind.BLOCK)
    types = {"v": int, "fingerprint": str, "quant_spec": str, "shape": dict, "block_tokens": int, "index0": bool,
             "content": str, "raw_bytes": int}
    for key, typ in types.items():
        if not isinstance(meta.get(key), typ) or (typ is int and isinstance(meta[key], bool)):
            raise ContainerError(f"block header is missing or has a bad field {key!r}")
    if meta["v"] != BLOCK_VERSION:
        raise ContainerError(f"unsupported block version {meta['v']} (this build reads {BLOCK_VERSION})")
    if codec != Codec.RANS_CTX:
        raise ContainerError(f"unsupported block codec {codec.name}")
    return meta, payload


def decode_block(data: bytes, *, quant: QuantConfig, shape: ModelShape, block_tokens: int, index: int,
                 model_fingerprint: str, content: bytes | None = None) -> Tensors:
    """The block's tensors, after checking that it is the block the caller expects (model, spec, shape,
    position class and, when given, content hash)."""
    meta, payload = _open(data)
    want = {"fingerprint": model_fingerprint, "quant_spec": quant.spec(), "shape": shape.to_json(),
            "block_tokens": block_tokens, "index0": index == 0}
    for key, value in want.items():
        if meta[key] != value:
            raise ContainerError(f"stored block has {key}={meta[key]!r}, expected {value!r}")
    if content is not None and meta["content"] != content.hex():
        raise ContainerError("stored block has another content hash than the session recorded")
    if meta["raw_bytes"] != layout_bytes(quant, shape, block_tokens, index):
        raise ContainerError(f"block claims {meta['raw_bytes']} bytes of tensors, its layout holds another size")
    return entropy.decode_block(payload, layout(quant, shape, block_tokens, index), code_bits(quant, shape),
                                verified=True)  # unpack_container checked the checksum over these bytes
