"""Serialize a `KVState` losslessly: tensor bundle -> zstandard -> versioned container.

Invariant: `decode_kv(encode_kv(s)).equals(s)` (bit-identical codes, scales and windows). The header
meta carries the model fingerprint, the quant spec, the token count and every tensor's dtype and shape;
a state for another model, a mismatched shape, a zstd error or an oversized payload raises ContainerError.
"""

from __future__ import annotations

import zstandard

from kvstore.codec.container import Codec, ContainerError, Kind, pack_container, unpack_container
from kvstore.codec.tensors import decode_tensors, encode_tensors
from kvstore.quant.state import KVState

MAX_DECODED_BYTES = 4 << 30


def encode_kv(state: KVState, *, model_fingerprint: str, level: int = 3) -> bytes:
    raw = encode_tensors(state.tensors)
    meta = {
        "num_tokens": state.num_tokens, "quant_spec": state.quant_spec, "model_fingerprint": model_fingerprint,
        "state_meta": state.meta, "raw_bytes": len(raw),
        "shapes": {name: [str(a.dtype), list(a.shape)] for name, a in state.tensors},
    }
    return pack_container(Kind.KV, Codec.ZSTD, meta, zstandard.ZstdCompressor(level=level).compress(raw))


def decode_kv(data: bytes, *, model_fingerprint: str | None = None) -> KVState:
    _, codec, meta, payload = unpack_container(data, expect_kind=Kind.KV)
    try:
        fp, raw_len = meta["model_fingerprint"], int(meta["raw_bytes"])
        shapes, num_tokens, spec = meta["shapes"], int(meta["num_tokens"]), str(meta["quant_spec"])
        state_meta = meta["state_meta"]
    except (KeyError, TypeError, ValueError) as e:
        raise ContainerError(f"KV header is missing or has a bad field: {e}") from None
    if model_fingerprint is not None and fp != model_fingerprint:
        raise ContainerError(f"KV was made by model {str(fp)[:12]}..., this model is {model_fingerprint[:12]}...")
    if codec != Codec.ZSTD:
        raise ContainerError(f"unsupported KV codec {codec.name}")
    if not 0 <= raw_len <= MAX_DECODED_BYTES:
        raise ContainerError(f"KV claims {raw_len} decoded bytes, over the {MAX_DECODED_BYTES} limit")
    try:
        # A streaming read bounds memory even if a hostile frame declares a huge content size.
        with zstandard.ZstdDecompressor().stream_reader(payload) as reader:
            raw = reader.read(raw_len + 1)
    except zstandard.ZstdError as e:
        raise ContainerError(f"KV payload does not decompress: {e}") from None
    if len(raw) != raw_len:
        raise ContainerError(f"KV payload decompressed to {len(raw)} bytes, header says {raw_len}")
    tensors = decode_tensors(raw)
    got = {name: [str(a.dtype), list(a.shape)] for name, a in tensors}
    if got != shapes:
        raise ContainerError("KV tensors do not match the shapes in the header")
    if not isinstance(state_meta, dict):
        raise ContainerError("KV state meta must be an object")
    return KVState(num_tokens=num_tokens, quant_spec=spec, meta=state_meta, tensors=tensors)
