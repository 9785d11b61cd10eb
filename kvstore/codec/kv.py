"""Serialize a `KVState`: stream transforms -> tensor bundle -> zstd -> versioned container (kind KV).

Codec ZSTD_STREAMS (the default) first applies the lossless transforms of `kvstore.codec.streams`
(channel-major key codes, byte planes); codec ZSTD (older containers) compresses the bundle as is.

Container meta (canonical JSON):
    num_tokens          int >= 0
    quant_spec          str (QuantConfig.spec())
    model_fingerprint   str
    meta                the state's own JSON metadata
    shapes              {name: [dtype name, [dims...]]} for every tensor
    raw_bytes           size of the uncompressed tensor bundle (bounds decompression)

Invariants:
- `decode_kv(encode_kv(s, ...)).equals(s)`: the round trip is bit-exact (tensor order included).
- `decode_kv` never returns a state that does not match its header: fingerprint (when asked), shapes,
  dtypes, sizes are all checked; decompression is bounded by `MAX_RAW_BYTES` and by `raw_bytes`.
  Any problem raises ContainerError.
"""

from __future__ import annotations

import numpy as np
import zstandard

from kvstore.codec import streams
from kvstore.codec.container import Codec, ContainerError, Kind, pack_container, unpack_container
from kvstore.codec.tensors import DTYPE_CODES, decode_tensors, dtype_name, encode_tensors
from kvstore.quant.state import KVState

MAX_RAW_BYTES = 4 << 30  # refuse to decompress more than 4 GiB


def _shapes(tensors) -> dict[str, list]:
    return {name: [dtype_name(arr.dtype), [int(d) for d in arr.shape]] for name, arr in tensors}


def encode_kv(state: KVState, *, model_fingerprint: str, level: int = 3, codec: Codec = Codec.ZSTD_STREAMS,
              kind: Kind = Kind.KV) -> bytes:
    """Encode `state` for storage (as a container of `kind`: KV, or COLD_BLOCK for kvstore.codec.cold_block).
    Raises ContainerError if it cannot be encoded (dtype, meta, size)."""
    if not isinstance(model_fingerprint, str):
        raise ContainerError("model_fingerprint must be a str")
    if isinstance(state.num_tokens, bool) or not isinstance(state.num_tokens, int) or state.num_tokens < 0:
        raise ContainerError(f"num_tokens must be an int >= 0, got {state.num_tokens!r}")
    if not isinstance(state.quant_spec, str):
        raise ContainerError("quant_spec must be a str")
    tensors = state.tensors
    for name, arr in tensors:
        if not isinstance(arr, np.ndarray) or arr.dtype.newbyteorder("<").name not in DTYPE_CODES:
            raise ContainerError(f"tensor {name!r} has an unsupported dtype {getattr(arr, 'dtype', type(arr))}")
    if codec == Codec.ZSTD_STREAMS:
        ctx = streams.StreamContext.of(state.quant_spec, {n: a.shape for n, a in tensors})
        tensors = [(n, streams.forward(n, a, ctx)) for n, a in tensors]
    elif codec != Codec.ZSTD:
        raise ContainerError(f"cannot encode KV with codec {codec!r}")
    raw = encode_tensors(tensors)
    if len(raw) > MAX_RAW_BYTES:
        raise ContainerError(f"KV state is too large to store ({len(raw)} bytes > {MAX_RAW_BYTES})")
    payload = zstandard.ZstdCompressor(level=level, write_content_size=True).compress(raw)
    meta = {
        "num_tokens": state.num_tokens,
        "quant_spec": state.quant_spec,
        "model_fingerprint": model_fingerprint,
        "meta": state.meta,
        "shapes": _shapes(state.tensors),
        "raw_bytes": len(raw),
    }
    return pack_container(kind, codec, meta, payload)


def decompress_exact(payload: bytes, raw_bytes: int) -> bytes:
    """Decompress one zstd frame whose declared content size must equal `raw_bytes` (<= MAX_RAW_BYTES).

    libzstd enforces a declared content size, so memory is bounded by the check made before decompressing.
    """
    try:
        params = zstandard.get_frame_parameters(payload)
    except zstandard.ZstdError as e:
        raise ContainerError(f"KV payload does not decompress: not a zstd frame ({e})") from None
    size = params.content_size
    if size in (zstandard.CONTENTSIZE_UNKNOWN, zstandard.CONTENTSIZE_ERROR):
        raise ContainerError("KV payload does not decompress: the zstd frame does not declare its content size")
    if size > MAX_RAW_BYTES:
        raise ContainerError(f"KV payload declares {size} decoded bytes, over the {MAX_RAW_BYTES}-byte limit")
    if size != raw_bytes:
        raise ContainerError(f"KV payload decompressed to {size} bytes (zstd frame content size), "
                             f"header says raw_bytes={raw_bytes}")
    dobj = zstandard.ZstdDecompressor().decompressobj()
    try:
        raw = dobj.decompress(payload)
    except zstandard.ZstdError as e:
        raise ContainerError(f"KV payload does not decompress: {e}") from None
    if not dobj.eof:
        raise ContainerError("KV payload does not decompress: the zstd frame is truncated")
    if dobj.unused_data:
        raise ContainerError(f"KV payload has {len(dobj.unused_data)} trailing bytes after its zstd frame")
    if len(raw) != raw_bytes:
        raise ContainerError(f"KV payload decompressed to {len(raw)} bytes, expected {raw_bytes}")
    return raw


def _inverse_streams(tensors, meta) -> list[tuple[str, np.ndarray]]:
    header = meta["shapes"]
    try:
        shapes = {n: tuple(int(d) for d in header[n][1]) for n, _ in tensors}
        ctx = streams.StreamContext.of(meta["quant_spec"], shapes)
        return [(n, streams.inverse(n, a, np.dtype(header[n][0]), shapes[n], ctx)) for n, a in tensors]
    except (KeyError, IndexError, TypeError, ValueError, RuntimeError) as e:
        raise ContainerError(f"KV streams do not match the shapes in the header: {e}") from None


def decode_kv(data: bytes, *, model_fingerprint: str | None = None, kind: Kind = Kind.KV) -> KVState:
    """Decode a KV container (of `kind`). With `model_fingerprint`, refuse KV built by another model."""
    _, codec, meta, payload = unpack_container(data, expect_kind=kind)
    for key, typ in (("num_tokens", int), ("quant_spec", str), ("model_fingerprint", str), ("meta", dict),
                     ("shapes", dict), ("raw_bytes", int)):
        if key not in meta:
            raise ContainerError(f"KV header is missing or has a bad field: no {key!r}")
        if not isinstance(meta[key], typ) or isinstance(meta[key], bool):
            raise ContainerError(f"KV header is missing or has a bad field: {key!r} must be {typ.__name__}, "
                                 f"got {type(meta[key]).__name__}")
    if meta["num_tokens"] < 0:
        raise ContainerError(f"KV header is missing or has a bad field: num_tokens={meta['num_tokens']} is negative")
    if model_fingerprint is not None and meta["model_fingerprint"] != model_fingerprint:
        raise ContainerError(f"model fingerprint mismatch: KV was made by model {meta['model_fingerprint']!r}, "
                             f"this model is {model_fingerprint!r}")
    raw_bytes = meta["raw_bytes"]
    if raw_bytes < 0:
        raise ContainerError(f"KV header is missing or has a bad field: raw_bytes={raw_bytes} is negative")
    if raw_bytes > MAX_RAW_BYTES:
        raise ContainerError(f"KV claims {raw_bytes} decoded bytes, over the {MAX_RAW_BYTES}-byte limit")
    if codec in (Codec.ZSTD, Codec.ZSTD_STREAMS):
        raw = decompress_exact(payload, raw_bytes)
    else:  # Codec.RAW: the tensor bundle as is
        if len(payload) != raw_bytes:
            raise ContainerError(f"KV payload is {len(payload)} bytes, header says raw_bytes={raw_bytes}")
        raw = payload
    tensors = decode_tensors(raw, copy=codec != Codec.ZSTD_STREAMS)  # streams.inverse makes fresh arrays
    if codec == Codec.ZSTD_STREAMS:
        tensors = _inverse_streams(tensors, meta)
    shapes = _shapes(tensors)
    if shapes != meta["shapes"]:
        header = meta["shapes"]
        names = sorted(set(shapes) ^ set(header)) or [n for n in shapes if shapes[n] != header[n]]
        name = names[0]
        raise ContainerError(f"KV tensors do not match the shapes in the header: tensor {name!r} is "
                             f"{shapes.get(name, 'absent')} in the payload, {header.get(name, 'absent')} in the header")
    return KVState(num_tokens=meta["num_tokens"], quant_spec=meta["quant_spec"], meta=meta["meta"], tensors=tensors)
