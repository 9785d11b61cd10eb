"""Typed, chained, deterministic block hashes (never Python's `hash()`).

A session's token history is cut into blocks (`BlockGrid`): block 0 covers the attention-sink tokens
plus the first `block_tokens` tokens after them, every later block the next `block_tokens` tokens.
Block i's chain hash is

    h_i = blake2b-256(person="kvstash-block"; parent ‖ token ids ‖ domain ‖ salt)

over length-prefixed fields (`kvstore.digest.hash_fields`): `parent` is h_{i-1} (empty for block 0),
token ids are little-endian u32, `domain` (`KvDomain`) digests everything else that decides the KV of
given tokens (model fingerprint, quant spec, prefill chunk, block size, device kind), and `salt` (`Salt`)
scopes sharing: a tenant's private salt, derived by the server from the authenticated tenant (clients
never choose it), or the public salt of prefixes an operator marked public.

Invariants:
- Hashes are stable across processes, machines and releases (a fixed test vector guards them).
- Equal chain hashes mean equal tokens, domain and salt along the whole prefix; they do not by
  themselves promise bit-equal KV (floating point), which is why stored blocks also carry a content
  hash and are shared only when it matches (see kvstore/tiers/redis_tier.py).
- A content key (`content_key`) addresses a block by its bytes within a domain and salt.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from kvstore.digest import hash_fields

PUBLIC = b"public"


@dataclass(frozen=True, order=True)
class BlockHash:
    """A 32-byte block digest (chain hash or content key)."""

    digest: bytes

    def __post_init__(self) -> None:
        if not isinstance(self.digest, bytes) or len(self.digest) != 32:
            raise ValueError("a BlockHash is 32 bytes")

    @property
    def hex(self) -> str:
        return self.digest.hex()

    @classmethod
    def from_hex(cls, text: str) -> BlockHash:
        return cls(bytes.fromhex(text))

    def __repr__(self) -> str:
        return f"BlockHash({self.hex[:16]}…)"


@dataclass(frozen=True)
class Salt:
    """Who may share a block: one tenant (private) or everyone (public)."""

    value: bytes
    public: bool = False

    @classmethod
    def for_tenant(cls, tenant: str, key: bytes = b"") -> Salt:
        """The tenant's private salt; `key` is an optional server secret (prefix.salt_key)."""
        return cls(hash_fields([b"tenant", tenant, key], person=b"kvstash-salt"))

    @classmethod
    def public_salt(cls, key: bytes = b"") -> Salt:
        return cls(hash_fields([PUBLIC, key], person=b"kvstash-salt"), public=True)


@dataclass(frozen=True)
class KvDomain:
    """Everything besides the tokens that decides a block's KV bits; hashed once per worker."""

    model_fingerprint: str
    quant_spec: str
    prefill_chunk: int  # canonical forward-pass length of a prefill (kvstore.prefix.canonical)
    block_tokens: int
    device_kind: str  # "cpu", "cuda", ...: kernels differ in their rounding

    @property
    def digest(self) -> bytes:
        return hash_fields([self.model_fingerprint, self.quant_spec, self.prefill_chunk, self.block_tokens,
                            self.device_kind], person=b"kvstash-domain")


@dataclass(frozen=True)
class BlockGrid:
    """Token spans of blocks: block 0 = [0, sinks + B), block i = [sinks + iB, sinks + (i+1)B)."""

    block_tokens: int
    sinks: int = 0

    def end(self, i: int) -> int:
        return self.sinks + (i + 1) * self.block_tokens

    def start(self, i: int) -> int:
        return 0 if i == 0 else self.sinks + i * self.block_tokens

    def count(self, tokens: int) -> int:
        """Whole blocks within the first `tokens` tokens."""
        return max(0, tokens - self.sinks) // self.block_tokens


def _tokens(ids) -> bytes:
    return np.asarray(ids, dtype=np.int64).astype("<u4").tobytes()


def chain(tokens, grid: BlockGrid, domain: KvDomain, salts, parent: BlockHash | None = None,
          first: int = 0, count: int | None = None) -> list[BlockHash]:
    """Chain hashes of blocks first, first+1, ... of `tokens` (whole blocks only, at most `count`).

    `salts` is one `Salt` for every block, or a callable block index -> Salt (a public prefix followed by
    private blocks); `parent` is the hash of block first-1 (None when first == 0)."""
    if (parent is None) != (first == 0):
        raise ValueError("parent must be given exactly when the chain does not start at block 0")
    n = grid.count(len(tokens)) - first
    n = max(0, n if count is None else min(n, count))
    dom = domain.digest
    out: list[BlockHash] = []
    prev = parent.digest if parent is not None else b""
    for i in range(first, first + n):
        salt = salts(i) if callable(salts) else salts
        prev = hash_fields([prev, _tokens(tokens[grid.start(i):grid.end(i)]), dom, salt.value], person=b"kvstash-block")
        out.append(BlockHash(prev))
    return out


def content_key(content_hash: bytes, domain: KvDomain, salt: Salt) -> BlockHash:
    """Address of a block by its bytes (for blocks no prefix lookup will ask for by tokens)."""
    return BlockHash(hash_fields([content_hash, domain.digest, salt.value], person=b"kvstash-content"))
