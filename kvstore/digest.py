"""Deterministic hashing over length-prefixed fields.

Never Python's `hash()`: it is salted per process. Every field is prefixed by its length (8 bytes,
little-endian) so that field boundaries cannot be shifted to forge a collision ("ab"+"c" != "a"+"bc").
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Iterable

DIGEST_SIZE = 32  # bytes; blake2b-256


def _as_bytes(field: bytes | str | int) -> bytes:
    if isinstance(field, bytes):
        return field
    if isinstance(field, str):
        return field.encode("utf-8")
    if isinstance(field, int):
        return struct.pack("<q", field)
    raise TypeError(f"cannot hash field of type {type(field).__name__}")


def _feed(h, fields: Iterable[bytes | str | int]) -> None:
    """Feed `fields` to hash `h`, each prefixed by its length (the one place the encoding is defined)."""
    for f in fields:
        b = _as_bytes(f)
        h.update(struct.pack("<Q", len(b)))
        h.update(b)


def hash_fields(fields: Iterable[bytes | str | int], *, person: bytes = b"kvstash", digest_size: int = DIGEST_SIZE) -> bytes:
    """blake2b over length-prefixed fields; `person` separates hash domains (max 16 bytes)."""
    h = hashlib.blake2b(digest_size=digest_size, person=person)
    _feed(h, fields)
    return h.digest()


def prefix_hashes(fields: list[bytes | str | int], ends: Iterable[int], *, person: bytes = b"kvstash",
                  digest_size: int = DIGEST_SIZE) -> list[bytes]:
    """`hash_fields(fields[:e])` for each e of `ends` (ascending), in one pass over `fields`."""
    h = hashlib.blake2b(digest_size=digest_size, person=person)
    out, done = [], 0
    for e in ends:
        _feed(h, fields[done:e])
        done = e
        out.append(h.copy().digest())
    return out


def checksum(data: bytes | memoryview, *, digest_size: int = 16) -> bytes:
    """Integrity checksum of a stored payload (blake2b-128)."""
    return hashlib.blake2b(data, digest_size=digest_size, person=b"kvstash-sum").digest()
