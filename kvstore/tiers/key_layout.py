"""`KeyLayout`: the Redis name of every key `RedisTier` writes, chosen so that one tenant spreads evenly over
every Redis Cluster shard while each Lua script still touches keys of one slot.

A scope (a tenant, or `~public` for public prefixes) owns BUCKETS buckets. Bucket b of a scope lives in
slot `(offset(scope) + b * 16384 / BUCKETS) mod 16384`: the buckets are evenly spaced around the slot ring
(a shard serving a contiguous range of k slots holds about k / 16384 of every scope's buckets), and the
offset (a deterministic hash of the scope) keeps tenants from piling their bucket 0 onto one slot. A key
of bucket b carries the hash tag of that slot (`SlotTags`: the smallest decimal number whose CRC16 falls in
the slot), so its slot is known whatever the rest of the key says.

Keys (`ns` the namespace, `{t}` the slot's tag, `scope` a tenant id or `~public`):
- `ns:session:{t}:<tenant>:<session_id>`: the session's HASH (`m` its manifest); bucket = hash(session id).
- `ns:block:{t}:<scope>:<hex>`: one block's HASH; bucket = the block's key digest (already a salted
  cryptographic hash), so a tenant's blocks, and the public ones, spread like its sessions.
- `ns:count:{t}:<scope>`: the bucket's counters (`bytes`, `sessions`, `blocks`) of what the bucket holds;
  a scope's statistics are the sum of its BUCKETS counters.
- `ns:registry:{t}` with `t` the tag of public bucket 0: the registry of public prefixes (its bytes count
  in public bucket 0's counters, which share its slot).
- `ns:layout`: the migration marker (kvstore/tiers/legacy_layout.py).

Invariants:
- `SlotTags` is a pure function of Redis Cluster's CRC16 (fixed by the Cluster specification): stored key
  names never change between builds. BUCKETS is part of the layout: changing it moves every key.
- A key's bucket is a deterministic hash (blake2b over length-prefixed fields, or the digest itself), never
  Python's `hash()`.
- Tenant and session ids match `[A-Za-z0-9._-]{1,128}` (no `{`, `}`, `:` or glob character), so a key
  parses back unambiguously and a tenant's keys are matched by a glob pattern.
"""

from __future__ import annotations

import binascii
import hashlib
from functools import cache

from kvstore.tiers.manifest import BlockRef, validate_id

SLOTS = 16384
BUCKETS = 64  # buckets per scope: the number of counters a scope's statistics sum
PUBLIC_SCOPE = "~public"  # cannot collide with a tenant id ([A-Za-z0-9._-])


class SlotTags:
    """The hash tag of every Redis Cluster slot: the smallest non-negative decimal number whose CRC16
    (CRC-16/XMODEM, as Redis Cluster) is that slot modulo 16384."""

    @staticmethod
    @cache
    def table() -> tuple[str, ...]:
        found: dict[int, int] = {}
        i = 0
        while len(found) < SLOTS:
            found.setdefault(binascii.crc_hqx(str(i).encode(), 0) % SLOTS, i)
            i += 1
        return tuple(str(found[s]) for s in range(SLOTS))

    @classmethod
    def tag(cls, slot: int) -> str:
        return cls.table()[slot]


def _h32(*fields: str) -> int:
    """A 32-bit deterministic hash of length-prefixed UTF-8 fields."""
    h = hashlib.blake2b(digest_size=8, person=b"kvstash-layout")
    for f in fields:
        b = f.encode()
        h.update(len(b).to_bytes(4, "little") + b)
    return int.from_bytes(h.digest()[:4], "little")


class KeyLayout:
    def __init__(self, namespace: str):
        if not isinstance(namespace, str) or not namespace or any(c in namespace for c in "{}*?[]\\"):
            raise ValueError("namespace must be a non-empty string without braces or glob characters")
        self.ns = namespace

    # ---- slots -----------------------------------------------------------------------------------------
    @staticmethod
    def slot(scope: str, bucket: int) -> int:
        return (_h32("scope", scope) + bucket * (SLOTS // BUCKETS)) % SLOTS

    def _tag(self, scope: str, bucket: int) -> str:
        return "{" + SlotTags.tag(self.slot(scope, bucket)) + "}"

    @staticmethod
    def session_bucket(session_id: str) -> int:
        return _h32("session", session_id) % BUCKETS

    @staticmethod
    def block_bucket(ref: BlockRef) -> int:
        return int.from_bytes(ref.key[:4], "little") % BUCKETS

    @staticmethod
    def scope(tenant: str | None) -> str:
        return PUBLIC_SCOPE if tenant is None else validate_id(tenant, "tenant")

    # ---- keys ------------------------------------------------------------------------------------------
    def session_key(self, tenant: str, session_id: str) -> str:
        validate_id(tenant, "tenant")
        validate_id(session_id, "session id")
        return f"{self.ns}:session:{self._tag(tenant, self.session_bucket(session_id))}:{tenant}:{session_id}"

    def block_key(self, tenant: str, ref: BlockRef) -> str:
        """Where a block lives: its tenant's scope, or the public scope (then `tenant` is not used)."""
        scope = self.scope(None if ref.public else tenant)
        return f"{self.ns}:block:{self._tag(scope, self.block_bucket(ref))}:{scope}:{ref.key.hex()}"

    def counter_key(self, scope: str, bucket: int) -> str:
        return f"{self.ns}:count:{self._tag(scope, bucket)}:{scope}"

    def session_counter(self, tenant: str, session_id: str) -> str:
        """The counters in the session key's slot (they count the session's record)."""
        return self.counter_key(self.scope(tenant), self.session_bucket(session_id))

    def block_counter(self, tenant: str, ref: BlockRef) -> str:
        """The counters in the block key's slot (they count the block)."""
        return self.counter_key(self.scope(None if ref.public else tenant), self.block_bucket(ref))

    def counter_keys(self, tenant: str | None) -> list[str]:
        """Every counter of a tenant's scope (None: the public scope): their sum is the scope's statistics."""
        scope = self.scope(tenant)
        return [self.counter_key(scope, b) for b in range(BUCKETS)]

    @property
    def registry_key(self) -> str:
        return f"{self.ns}:registry:{self._tag(PUBLIC_SCOPE, 0)}"

    @property
    def layout_key(self) -> str:
        """Set once no key of the legacy layout is left (kvstore/tiers/legacy_layout.py)."""
        return f"{self.ns}:layout"

    @property
    def registry_counter(self) -> str:
        return self.counter_key(PUBLIC_SCOPE, 0)

    # ---- patterns and parsing -----------------------------------------------------------------------------
    def session_pattern(self, tenant: str | None = None) -> str:
        return f"{self.ns}:session:*" if tenant is None else f"{self.ns}:session:{{*}}:{validate_id(tenant, 'tenant')}:*"

    @property
    def block_pattern(self) -> str:
        return f"{self.ns}:block:*"

    @property
    def counter_pattern(self) -> str:
        return f"{self.ns}:count:*"

    @staticmethod
    def session_of(key: str) -> tuple[str, str]:
        """(tenant, session id) of a session key."""
        tenant, session_id = key.rsplit("}:", 1)[1].split(":")
        return tenant, session_id

    def counter_of_block(self, key: str) -> str:
        """The counters in a block key's slot."""
        head, rest = key.split("}:", 1)
        return f"{self.ns}:count:{head.rsplit(':', 1)[1]}}}:{rest.split(':', 1)[0]}"
