"""`BlockNamer`: the Redis name of every block a session stores, per tenant and model.

A canonical block (part of the complete prefill chunks from position 0, kvstore.prefix.canonical) is named
by its chain hash (kvstore.prefix.block_hash), so another session with the same prompt finds it; any other
block, the tail, and a canonical block whose bits clash with a stored one are named by a content key.

Invariants:
- Tenants never share private blocks: every name is salted with the tenant's salt, derived from the
  authenticated tenant and the operator's `salt_key` (clients never choose it).
- The blocks of a registered public prefix are named with the public salt, whoever asks, and the chain
  continues from them with the tenant's salt; `public` holds exactly the registry's block names.
- Cold blocks are content-keyed in their own domain (the cold spec is part of it), so a cold copy never
  answers for a warm one.
"""

from __future__ import annotations

from kvstore.config import QuantConfig
from kvstore.prefix.block_hash import BlockGrid, BlockHash, KvDomain, Salt, chain, content_key
from kvstore.tiers.manifest import BlockRef
from kvstore.tiers.store_types import ModelIdentity, StoreSettings


class BlockNamer:
    def __init__(self, model: ModelIdentity, settings: StoreSettings):
        quant: QuantConfig = model.quant
        self.block_tokens, self.chunk = settings.block_tokens, settings.prefill_chunk
        self.grid = BlockGrid(settings.block_tokens, quant.sinks)
        self.domain = KvDomain(model.fingerprint, quant.spec(), self.chunk, self.block_tokens, model.device_kind)
        self.cold_domain = None if settings.cold is None else KvDomain(
            model.fingerprint, f"{quant.spec()}>cold:{settings.cold.spec()}", self.chunk, self.block_tokens,
            model.device_kind)
        self._salt_key = settings.salt_key
        self.public_salt = Salt.public_salt(self._salt_key)
        self.public: set[bytes] = set()  # chain hashes of registered public prefix blocks

    def salt(self, tenant: str) -> Salt:
        return Salt.for_tenant(tenant, self._salt_key)

    def chain(self, tenant: str, tokens: list[int], count: int | None = None) -> list[tuple[BlockHash, bool]]:
        """(chain hash, public?) of the whole blocks of `tokens`: blocks of a registered public prefix are
        hashed with the public salt, the rest (chained on) with the tenant's."""
        n_pub = 0
        if self.public:
            for h in chain(tokens, self.grid, self.domain, self.public_salt, count=count):
                if h.digest not in self.public:
                    break
                n_pub += 1
        mine = self.salt(tenant)
        hashes = chain(tokens, self.grid, self.domain, lambda i: self.public_salt if i < n_pub else mine, count=count)
        return [(h, i < n_pub) for i, h in enumerate(hashes)]

    def public_chain(self, tokens: list[int]) -> list[BlockHash]:
        """Chain hashes of the whole blocks of `tokens` under the public salt (a prefix being published)."""
        return chain(tokens, self.grid, self.domain, self.public_salt)

    def by_content(self, tenant: str, content: bytes) -> BlockRef:
        """The private, content-keyed record of a block (or tail) with content hash `content`."""
        return BlockRef(content_key(content, self.domain, self.salt(tenant)).digest, content)

    def cold_by_content(self, tenant: str, content: bytes) -> BlockRef:
        """The record of a cold block whose warm content hash is `content`."""
        return BlockRef(content_key(content, self.cold_domain, self.salt(tenant)).digest, content)
