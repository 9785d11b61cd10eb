"""The versioned binary container every stored object is wrapped in.

Layout (all integers little-endian, `struct`):

    offset  size  field
    0       4     magic b"KVST"
    4       2     u16 format version (FORMAT_VERSION)
    6       1     u8 kind   (Kind)
    7       1     u8 codec  (Codec: how the payload is compressed; the caller (de)compresses)
    8       4     u32 meta length in bytes
    12      8     u64 payload length in bytes
    20      16    checksum of header[0:20] + meta + payload: xxh3-128 keyed by b"kvstash-sum"
    36      M     meta: canonical JSON object (sort_keys, compact separators, utf-8, no NaN/inf)
    36+M    P     payload bytes

Invariants:
- `unpack_container(pack_container(k, c, m, p)) == (k, c, m, p)` for every JSON-object `m`.
- Anything else is rejected with a `ContainerError` saying what is wrong: short or truncated data,
  trailing bytes, bad magic, unsupported version, checksum mismatch (which covers kind, codec and
  both lengths, so a flipped header byte is caught), unknown kind/codec, meta not a JSON object,
  or a kind other than the one expected.
- Nothing is ever unpickled; meta is plain JSON.
- Only FORMAT_VERSION is read or written: the pre-release versions 1 (blake2b sum) and 2 (sha256 sum)
  were dropped before the first release (issue #18) and are refused as unsupported.
- The checksum detects corruption (Redis, disk, network), it does not authenticate: names are
  content-addressed by the chained block hashes (`kvstore.prefix.block_hash`), never by this sum.
"""

from __future__ import annotations

import enum
import json
import struct
from typing import Any

import xxhash

MAGIC = b"KVST"
FORMAT_VERSION = 3
READ_VERSIONS = (FORMAT_VERSION,)
_PREFIX = struct.Struct("<4sHBBIQ")  # magic, version, kind, codec, meta length, payload length
_SUM_SIZE = 16
HEADER_SIZE = _PREFIX.size + _SUM_SIZE  # 36 bytes


def container_sum(version: int, *parts: bytes | memoryview) -> bytes:
    """The 16-byte xxh3-128 checksum a container of `version` (FORMAT_VERSION) stores over `parts`."""
    if version != FORMAT_VERSION:
        raise ContainerError(f"unsupported container version {version}")
    h = xxhash.xxh3_128(b"kvstash-sum")
    for p in parts:
        h.update(p)
    return h.digest()[:_SUM_SIZE]


class ContainerError(ValueError):
    """Stored bytes are not a valid container (or not the one expected); the message says why."""


class Kind(enum.IntEnum):
    MANIFEST = 1
    KV = 2
    BLOCK = 3
    COLD_BLOCK = 4  # a block in the lossy cold format (kvstore.codec.cold_block)


class Codec(enum.IntEnum):
    RAW = 0
    ZSTD = 1  # zstd over the tensor bundle as is
    ZSTD_STREAMS = 2  # zstd over the bundle of stream-transformed tensors (kvstore.codec.streams)
    RANS_CTX = 3  # one KV block, rANS with previous-token contexts (kvstore.codec.entropy)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"non-finite number {name} in JSON")


def encode_meta(meta: dict) -> bytes:
    """Canonical JSON of a meta object (sorted keys, compact, utf-8). Raises ContainerError if not encodable."""
    if not isinstance(meta, dict):
        raise ContainerError(f"container meta must be a dict, not {type(meta).__name__}")
    try:
        text = json.dumps(meta, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise ContainerError(f"container meta is not JSON-serializable: {e}") from None
    return text.encode("utf-8")


def pack_container(kind: Kind, codec: Codec, meta: dict, payload: bytes) -> bytes:
    """Wrap `payload` (already compressed with `codec` by the caller) and `meta` in a checksummed container."""
    try:
        kind, codec = Kind(kind), Codec(codec)
    except ValueError as e:
        raise ContainerError(f"cannot pack: {e}") from None
    if not isinstance(payload, (bytes, bytearray, memoryview)):
        raise ContainerError(f"container payload must be bytes, not {type(payload).__name__}")
    meta_b = encode_meta(meta)
    payload = bytes(payload)
    if len(meta_b) > 0xFFFFFFFF:
        raise ContainerError(f"container meta is too large ({len(meta_b)} bytes)")
    prefix = _PREFIX.pack(MAGIC, FORMAT_VERSION, int(kind), int(codec), len(meta_b), len(payload))
    return b"".join((prefix, container_sum(FORMAT_VERSION, prefix, meta_b, payload), meta_b, payload))


def container_header(data: bytes) -> bytes:
    """A container's fixed header (prefix and checksum): it names the container's content, since the checksum
    covers everything else. Not validated here."""
    return bytes(data[:HEADER_SIZE])


def container_type(data: bytes) -> tuple[Kind, Codec]:
    """The (kind, codec) a container's prefix claims, for choosing its decoder; only the magic, version and
    enum values are checked here: the decoder's `unpack_container` validates the rest (checksum included)."""
    if not isinstance(data, (bytes, bytearray, memoryview)) or len(data) < _PREFIX.size:
        raise ContainerError("not a kvstash container: too short to hold a header")
    magic, version, kind_v, codec_v, _, _ = _PREFIX.unpack_from(data, 0)
    if magic != MAGIC or version not in READ_VERSIONS:
        raise ContainerError(f"not a container this build reads (magic {magic!r}, version {version})")
    try:
        return Kind(kind_v), Codec(codec_v)
    except ValueError:
        raise ContainerError(f"unknown container kind {kind_v} or codec {codec_v}") from None


def unpack_container(data: bytes, expect_kind: Kind | None = None) -> tuple[Kind, Codec, dict, bytes]:
    """Validate and open a container; returns (kind, codec, meta, payload) with the payload as stored."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise ContainerError(f"expected bytes, got {type(data).__name__}")
    data = bytes(data)
    if len(data) < HEADER_SIZE:
        if len(data) >= 4 and data[:4] != MAGIC:
            raise ContainerError(f"bad magic {data[:4]!r}: not a kvstash container")
        raise ContainerError(f"truncated container: {len(data)} bytes, the header alone is {HEADER_SIZE}")
    magic, version, kind_v, codec_v, meta_len, payload_len = _PREFIX.unpack_from(data, 0)
    if magic != MAGIC:
        raise ContainerError(f"bad magic {magic!r}: not a kvstash container (expected {MAGIC!r})")
    if version not in READ_VERSIONS:
        raise ContainerError(f"unsupported container version {version} (this build reads versions "
                             f"{', '.join(map(str, READ_VERSIONS))})")
    expected = HEADER_SIZE + meta_len + payload_len
    if len(data) < expected:
        raise ContainerError(f"truncated container: {len(data)} bytes, header announces {expected}")
    if len(data) > expected:
        raise ContainerError(f"{len(data) - expected} unexpected trailing bytes after the container")
    stored_sum = data[_PREFIX.size:HEADER_SIZE]
    body = memoryview(data)
    if container_sum(version, body[:_PREFIX.size], body[HEADER_SIZE:]) != stored_sum:
        raise ContainerError("checksum mismatch: the container is corrupt")
    try:
        kind = Kind(kind_v)
    except ValueError:
        raise ContainerError(f"unknown container kind {kind_v}") from None
    try:
        codec = Codec(codec_v)
    except ValueError:
        raise ContainerError(f"unknown container codec {codec_v}") from None
    meta_b = data[HEADER_SIZE:HEADER_SIZE + meta_len]
    try:
        meta = json.loads(meta_b.decode("utf-8"), parse_constant=_reject_constant)
    except (UnicodeDecodeError, ValueError) as e:
        raise ContainerError(f"container meta is not valid JSON: {e}") from None
    if not isinstance(meta, dict):
        raise ContainerError(f"container meta must be a JSON object, got {type(meta).__name__}")
    if expect_kind is not None and kind != expect_kind:
        raise ContainerError(f"wrong container kind: expected a {Kind(expect_kind).name} object, found {kind.name}")
    return kind, codec, meta, data[HEADER_SIZE + meta_len:]
