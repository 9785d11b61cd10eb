"""`LayoutMigration`: moves what builds before issue 17 stored (`LegacyLayout`: every key of a tenant in the
one `{<tenant>}` slot, public blocks in `{~public}`) into the spread layout of kvstore/tiers/key_layout.py.

A legacy session is copied, then removed: its manifest and the containers of its blocks are read from the
legacy keys and committed through `RedisTier.commit_session` (so the new layout's ordering and counters
hold), then the legacy session is deleted and its legacy block references released with the same scripts,
run on legacy keys (all of one legacy scope share a slot). Registered public prefixes are published in the
new layout before any session, then unregistered from the legacy registry.

Invariants:
- No session is lost. A session is removed from the legacy keys only after its manifest is committed in the
  new layout (or a newer record of it is there already). A session whose stored KV is incomplete or
  mismatched in the legacy keys (evicted, expired) is committed with its full token history and no KV:
  it is recomputed on resume, exactly as any session whose blocks are gone.
- The bytes are unchanged: a migrated manifest and its block containers are byte-for-byte the legacy ones.
- Idempotent and safe to run concurrently (every worker runs it at start and before each sweep): a
  manifest is committed only over an absent or older record (compare-and-set), a legacy session is deleted
  only if its manifest is still the one copied, and a loser's block references are released.
- A corrupt legacy manifest is left in place (and counted): nothing is guessed.
- When no legacy session or public prefix is left, the remaining legacy keys (orphan blocks, counters)
  are deleted and `{ns}:layout` is set to LAYOUT_DONE; later runs then return at once (`force` scans
  again, e.g. after an older build wrote legacy keys during a rolling upgrade).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from kvstore.codec.container import ContainerError
from kvstore.tiers import redis_scripts as lua
from kvstore.tiers.key_layout import PUBLIC_SCOPE
from kvstore.tiers.manifest import BlockRef, SessionManifest
from kvstore.tiers.redis_tier import F_MANIFEST, BlockRefused, RedisTier, StaleManifest, manifest_tag

LAYOUT_DONE = b"2"  # {ns}:layout once nothing of the legacy layout is left


class LegacyLayout:
    """The key names of builds before issue 17 (`{ns}:sess:{<tenant>}:<id>`, `{ns}:blk:{<scope>}:<hex>`,
    `{ns}:stats:{<scope>}`, `{ns}:public:{~public}`)."""

    def __init__(self, namespace: str):
        self.ns = namespace

    def session_key(self, tenant: str, session_id: str) -> str:
        return f"{self.ns}:sess:{{{tenant}}}:{session_id}"

    def stats_key(self, tenant: str | None) -> str:
        return f"{self.ns}:stats:{{{PUBLIC_SCOPE if tenant is None else tenant}}}"

    def block_key(self, tenant: str, ref: BlockRef) -> str:
        return f"{self.ns}:blk:{{{PUBLIC_SCOPE if ref.public else tenant}}}:{ref.key.hex()}"

    @property
    def registry_key(self) -> str:
        return f"{self.ns}:public:{{{PUBLIC_SCOPE}}}"

    @property
    def patterns(self) -> tuple[str, ...]:
        return tuple(f"{self.ns}:{kind}:{{*" for kind in ("sess", "blk", "stats", "public"))

    @staticmethod
    def session_of(key: str) -> tuple[str, str]:
        tenant, _, session_id = key.split("{", 1)[1].partition("}:")
        return tenant, session_id


@dataclass(frozen=True)
class MigrationReport:
    sessions: int = 0  # legacy sessions committed in the new layout with their KV
    without_kv: int = 0  # committed with their history only (their legacy KV was incomplete)
    superseded: int = 0  # a newer record was in the new layout already: the legacy one was only removed
    corrupt: int = 0  # legacy manifests that do not decode: left in place
    public_prefixes: int = 0  # legacy public prefixes registered in the new layout
    purged: int = 0  # legacy keys deleted once nothing was left to migrate


class LayoutMigration:
    def __init__(self, tier: RedisTier):
        self.tier, self.client = tier, tier.client
        self.old = LegacyLayout(tier.namespace)
        self._delete = self.client.register_script(lua.DELETE)
        self._refs = self.client.register_script(lua.REFS)
        self._unpublish = self.client.register_script(lua.UNPUBLISH)

    def run(self, force: bool = False) -> MigrationReport:
        """Migrate every legacy public prefix and session (see the module doc)."""
        if not force and self.client.get(self.tier.keys.layout_key) == LAYOUT_DONE:
            return MigrationReport()
        counts = {f.name: 0 for f in dataclasses.fields(MigrationReport)}
        for pid, raw in self.client.hgetall(self.old.registry_key).items():
            counts["public_prefixes"] += self._move_prefix(pid.decode(), raw)
        for key in self.client.scan_iter(match=self.old.patterns[0], count=500):
            counts[self._move_session(key.decode())] += 1
        if not self._left():
            for pattern in self.old.patterns:
                keys = list(self.client.scan_iter(match=pattern, count=500))
                for k in keys:
                    counts["purged"] += int(self.client.delete(k))
            self.client.set(self.tier.keys.layout_key, LAYOUT_DONE)
        return MigrationReport(**counts)

    def _left(self) -> bool:
        """Whether any legacy session or public prefix is still stored."""
        return bool(self.client.hlen(self.old.registry_key)) or \
            next(iter(self.client.scan_iter(match=self.old.patterns[0], count=500)), None) is not None

    def _legacy_blocks(self, tenant: str, refs: list[BlockRef]) -> dict[bytes, bytes] | None:
        """The legacy containers of `refs` by key digest, None unless every one is there with its content."""
        pipe = self.client.pipeline(transaction=False)
        for r in refs:
            pipe.hmget(self.old.block_key(tenant, r), ["c", "d"])
        rows = pipe.execute() if refs else []
        if any(c != r.content or d is None for r, (c, d) in zip(refs, rows)):
            return None
        return {r.key: d for r, (_, d) in zip(refs, rows)}

    def _move_prefix(self, pid: str, raw: bytes) -> int:
        digests = [raw[i:i + 32] for i in range(0, len(raw), 32)]
        pipe = self.client.pipeline(transaction=False)
        for d in digests:
            pipe.hget(self.old.block_key("", BlockRef(d, bytes(32), True)), "c")
        contents = pipe.execute()
        moved = 0
        if None not in contents:
            refs = [BlockRef(d, c, True) for d, c in zip(digests, contents)]
            data = self._legacy_blocks("", refs)
            if data is not None:
                moved = int(self.tier.publish(refs, data))
        entry = self._unpublish(keys=[self.old.registry_key, self.old.stats_key(None)], args=[pid])
        if entry:
            self._release_legacy("", [BlockRef(d, bytes(32), True) for d in digests])
        return moved

    def _move_session(self, key: str) -> str:
        """Copy one legacy session into the new layout, then remove it; which report field it counts in."""
        tenant, sid = self.old.session_of(key)
        raw = self.client.hget(key, F_MANIFEST)
        if raw is None:
            return "superseded"  # removed meanwhile by another migrator
        try:
            m = RedisTier.manifest_of(raw, tenant, sid)
        except (ContainerError, ValueError):
            return "corrupt"
        outcome = self._commit(m)
        res = int(self._delete(keys=[key, self.old.stats_key(tenant)], args=[manifest_tag(raw)]))
        if res == 1:
            self._release_legacy(tenant, m.blocks)
        return outcome

    def _commit(self, m: SessionManifest) -> str:
        data = self._legacy_blocks(m.tenant, m.blocks)
        for _ in range(3):
            record = self.tier.get_record(m.tenant, m.session_id)
            if record is not None and record[0].updated_at >= m.updated_at:
                return "superseded"
            held, sha = (record[0].blocks, record[1]) if record else ([], "")
            done = m if data is not None else dataclasses.replace(m, blocks=[], kv_tokens=0)
            try:
                self.tier.commit_session(done, held, data or {}, expect_sha=sha)
                return "sessions" if data is not None else "without_kv"
            except BlockRefused:  # a new-layout block under the same name holds other bits: keep the history
                data = None
            except StaleManifest:  # another writer meanwhile: look again
                continue
        return "superseded"

    def _release_legacy(self, tenant: str, refs: list[BlockRef]) -> None:
        """Release one legacy reference to each of `refs` (each legacy scope is one slot: one script each)."""
        for public in (False, True):
            scope = [r for r in refs if r.public == public]
            if scope:
                owner = None if public else tenant
                self._refs(keys=[self.old.stats_key(owner)] + [self.old.block_key(tenant, r) for r in scope],
                           args=["drop", 0, 0])
