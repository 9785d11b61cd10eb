"""The versioned, checksummed binary container every stored object is wrapped in.

Layout (little-endian):

    offset  size  field
    0       4     magic b"KVST"
    4       2     format version (FORMAT_VERSION)
    6       1     kind (Kind)
    7       1     codec (Codec) of the payload
    8       4     meta length M
    12      8     payload length P
    20      16    checksum: blake2b-128 over bytes [0, 20) + meta + payload
    36      M     meta: canonical JSON object (sorted keys, UTF-8)
    36+M    P     payload

Invariants: `unpack_container(pack_container(k, c, m, p)) == (k, c, m, p)`; any truncation, extension,
flipped bit, unknown version/kind/codec or non-object meta raises `ContainerError` with what is wrong.
Nothing here ever unpickles or evaluates stored bytes.
"""

from __future__ import annotations

import enum
import json
import struct

from kvstore.hashing import checksum

MAGIC = b"KVST"
FORMAT_VERSION = 1
_HEAD = struct.Struct("<4sHBBIQ")  # magic, version, kind, codec, meta length, payload length
_SUM = 16
HEADER_SIZE = _HEAD.size + _SUM


class ContainerError(ValueError):
    """A stored object is malformed, truncated, corrupt, or not what the caller expected."""


class Kind(enum.IntEnum):
    MANIFEST = 1
    KV = 2
    BLOCK = 3


class Codec(enum.IntEnum):
    RAW = 0
    ZSTD = 1


def pack_container(kind: Kind, codec: Codec, meta: dict, payload: bytes) -> bytes:
    meta_bytes = json.dumps(meta, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    head = _HEAD.pack(MAGIC, FORMAT_VERSION, int(kind), int(codec), len(meta_bytes), len(payload))
    return b"".join((head, checksum(head + meta_bytes + payload), meta_bytes, payload))


def unpack_container(data: bytes, expect_kind: Kind | None = None) -> tuple[Kind, Codec, dict, bytes]:
    """Validate and split a container. Returns (kind, codec, meta, payload)."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise ContainerError(f"expected bytes, got {type(data).__name__}")
    data = bytes(data)
    if len(data) < HEADER_SIZE:
        raise ContainerError(f"truncated container: {len(data)} bytes, header alone is {HEADER_SIZE}")
    magic, version, kind, codec, meta_len, payload_len = _HEAD.unpack_from(data)
    if magic != MAGIC:
        raise ContainerError(f"bad magic {magic!r}: not a kvstash object")
    if version != FORMAT_VERSION:
        raise ContainerError(f"unsupported container version {version} (this build reads {FORMAT_VERSION})")
    expected = HEADER_SIZE + meta_len + payload_len
    if len(data) != expected:
        what = "truncated" if len(data) < expected else "trailing bytes after"
        raise ContainerError(f"{what} container: {len(data)} bytes, header says {expected}")
    body = data[HEADER_SIZE:]
    if checksum(data[:_HEAD.size] + body) != data[_HEAD.size:HEADER_SIZE]:
        raise ContainerError("checksum mismatch: the object is corrupt")
    try:
        kind, codec = Kind(kind), Codec(codec)
    except ValueError as e:
        raise ContainerError(f"unknown kind or codec: {e}") from None
    if expect_kind is not None and kind != expect_kind:
        raise ContainerError(f"expected a {expect_kind.name} object, found {kind.name}")
    try:
        meta = json.loads(body[:meta_len].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ContainerError(f"meta is not valid JSON: {e}") from None
    if not isinstance(meta, dict):
        raise ContainerError("meta must be a JSON object")
    return kind, codec, meta, body[meta_len:]
