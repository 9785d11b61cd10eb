"""`RedisTier`: sessions and their KV blocks in Redis (one node or a Redis Cluster) — manifests,
content-addressed blocks with reference counts, and per-bucket counters of what is stored.

Key layout: kvstore/tiers/key_layout.py. A tenant's sessions, blocks and counters are spread over BUCKETS
buckets evenly spaced around the Cluster's slot ring, so one tenant uses every shard; each Lua script
(kvstore/tiers/redis_scripts.py) touches keys of one bucket (one slot) only. The same layout serves a
single node. Manifests never expire (the durable truth); with `ttl_s` > 0 blocks expire unless referenced
again, so Redis may evict KV under `maxmemory-policy volatile-lru` but never a manifest.

What is atomic where (a session commit spans several buckets, so it is a sequence of atomic steps):
1. `commit_session`: (a) in each bucket holding blocks the new manifest adds, one script checks every add of
   the bucket (a block holding other content is a conflict, an absent one without data is missing), then
   creates the absent blocks and takes one reference to each. A refused bucket writes nothing; the buckets
   already taken are released and BlockRefused is raised. (b) In the session's bucket, one script
   compares-and-sets the manifest (StaleManifest otherwise: the references of (a) are released). (c) In
   each bucket holding blocks the replaced manifest listed and the new one does not, one script releases
   them (a block whose count reaches 0 is deleted).
   So a manifest is written only after every block it lists exists with a reference taken for it: a
   committed manifest never names a block that is not stored (modulo Redis's own durability: a Cluster
   failover can lose a master's last writes; a session whose block is gone is then recomputed from its
   history, never misread).
2. `delete_session`: the manifest is deleted (compare-and-set on its tag) in its bucket, then its blocks'
   references are released bucket by bucket.
3. A crash between steps can only leave reference counts too high (references taken for a manifest never
   written, or not yet released for one deleted or replaced), never too low. `collect` (the periodic
   sweep, `tiers.collect_interval_s`) recounts the references from every manifest and the public registry
   and sets each block's count to the truth, deleting blocks with none. It never touches a block referenced
   within `grace_s` before the sweep began: a commit takes its references less than `grace_s` before its
   manifest is written, so a manifest the sweep's scan missed can only list blocks it leaves alone. Hence
   nothing referenced is ever collected.
4. Counters: every script that changes a bucket updates that bucket's counters in the same script, so the
   counters always equal what the bucket stores (`bytes` = session hashes' field bytes + blocks' d and c
   bytes + registry entries' bytes, `sessions`, `blocks`). A tenant's statistics (quotas) are the sum of
   its BUCKETS counters (`tenant_stats`, one pipelined round trip): exact at every moment.
5. `publish`: the blocks' references are taken as in 1(a) (one for the registry entry), then the entry is
   registered in the registry's bucket (if it already was, the references are released); `unpublish`
   removes the entry, then releases its blocks.

Other invariants:
- A block is shared only when its stored content hash equals the writer's ("conflict" otherwise), so a
  session's KV restored from shared blocks is bit-identical to what it stored.
- Ids match `[A-Za-z0-9._-]{1,128}`; a manifest read back must belong to the key it was read from.
- The client must be created with `decode_responses=False` (values are binary).
- Keys of the previous layout (one `{tenant}` slot per tenant) are migrated by kvstore/tiers/legacy_layout.py.
"""

from __future__ import annotations

import hashlib
import time
from collections import Counter
from dataclasses import dataclass

import redis
from redis.cluster import RedisCluster

from kvstore.codec.container import ContainerError
from kvstore.tiers import redis_scripts as lua
from kvstore.tiers.key_layout import KeyLayout
from kvstore.tiers.manifest import BlockRef, SessionManifest

F_MANIFEST = b"m"
_NODES = 1024  # list_sessions cursors on a Cluster: node cursor * _NODES + node index
_FIELDS = ("bytes", "sessions", "blocks")


class StaleManifest(RuntimeError):
    """The stored manifest changed since the caller read or wrote it (another writer): nothing was written."""


class BlockRefused(RuntimeError):
    """Some blocks could not be referenced: `conflicts` hold other content, `missing` are absent (no data given)."""

    def __init__(self, conflicts: list[BlockRef], missing: list[BlockRef]):
        super().__init__(f"{len(conflicts)} block conflicts, {len(missing)} missing blocks")
        self.conflicts, self.missing = conflicts, missing


@dataclass(frozen=True)
class Committed:
    bytes: int  # bytes of the session's record
    sha1: str  # compare-and-set tag of the manifest as written (pass it as the next commit's expect_sha)


@dataclass(frozen=True)
class BlockStatus:
    state: str  # "present" (same content), "absent", "conflict" (the key holds other content)
    size: int  # stored bytes of the block (0 when absent)


class RedisTier:
    def __init__(self, client: redis.Redis | RedisCluster, namespace: str = "kvstash", ttl_s: int = 0):
        self.keys = KeyLayout(namespace)
        self.client, self.namespace, self.ttl_s = client, namespace, int(ttl_s)
        self._commit = client.register_script(lua.COMMIT)
        self._refs = client.register_script(lua.REFS)
        self._delete = client.register_script(lua.DELETE)
        self._collect = client.register_script(lua.COLLECT)
        self._publish = client.register_script(lua.PUBLISH)
        self._unpublish = client.register_script(lua.UNPUBLISH)

    # ---- keys ------------------------------------------------------------------------------------
    def session_key(self, tenant: str, session_id: str) -> str:
        return self.keys.session_key(tenant, session_id)

    def block_key(self, tenant: str, ref: BlockRef) -> str:
        """Where a block lives: its tenant's scope, or the public scope (then `tenant` is not used)."""
        return self.keys.block_key(tenant, ref)

    # ---- manifests ---------------------------------------------------------------------------------
    def get_manifest(self, tenant: str, session_id: str) -> SessionManifest | None:
        """The stored manifest, None if there is none; ContainerError if it is corrupt or misfiled."""
        record = self.get_record(tenant, session_id)
        return None if record is None else record[0]

    def get_record(self, tenant: str, session_id: str) -> tuple[SessionManifest, str] | None:
        """(manifest, its compare-and-set tag for `commit`), or None; ContainerError as `get_manifest`."""
        raw = self.client.hget(self.session_key(tenant, session_id), F_MANIFEST)
        return None if raw is None else (self.manifest_of(raw, tenant, session_id), manifest_tag(raw))

    @staticmethod
    def manifest_of(raw: bytes, tenant: str, session_id: str) -> SessionManifest:
        """The manifest `raw` stored under tenant/session_id; ContainerError if corrupt or misfiled."""
        m = SessionManifest.decode(raw)
        if (m.tenant, m.session_id) != (tenant, session_id):
            raise ContainerError(f"manifest stored under {tenant}/{session_id} belongs to {m.tenant}/{m.session_id}")
        return m

    # ---- blocks ------------------------------------------------------------------------------------
    def check(self, tenant: str, refs: list[BlockRef]) -> list[BlockStatus]:
        """Which of `refs` are stored with their content (one pipelined round trip)."""
        pipe = self.client.pipeline(transaction=False)
        for r in refs:
            key = self.block_key(tenant, r)
            pipe.hget(key, "c")
            pipe.hstrlen(key, "d")
        raw = pipe.execute()
        out = []
        for i, r in enumerate(refs):
            c, d = raw[2 * i], int(raw[2 * i + 1])
            state = "absent" if c is None else ("present" if c == r.content else "conflict")
            out.append(BlockStatus(state, d + len(c) if c is not None else 0))
        return out

    def get_blocks(self, tenant: str, refs: list[BlockRef]) -> list[bytes | None]:
        """The stored containers of `refs` (None where absent), in one pipelined round trip."""
        pipe = self.client.pipeline(transaction=False)
        for r in refs:
            key = self.block_key(tenant, r)
            pipe.hget(key, "d")
            if self.ttl_s:
                pipe.expire(key, self.ttl_s)
        raw = pipe.execute()
        return raw[::2] if self.ttl_s else raw

    # ---- writes ------------------------------------------------------------------------------------
    def commit_session(self, manifest: SessionManifest, previous: list[BlockRef], data: dict[bytes, bytes] | None = None,
                       expect_sha: str = "*") -> Committed:
        """Write `manifest`, reference its blocks and release those of `previous` (the manifest it replaces),
        in the order the module doc gives.

        `data` maps a block key digest to its container, for blocks that may be absent. Raises BlockRefused
        or StaleManifest, having written nothing that stays (references taken are released)."""
        tenant = manifest.tenant
        key = self.session_key(tenant, manifest.session_id)
        m = manifest.encode()
        new, old = Counter(manifest.blocks), Counter(previous)
        adds, drops = list((new - old).elements()), list((old - new).elements())
        now = int(time.time())
        self._take(tenant, adds, data or {}, now)
        res = self._commit(keys=[key, self.keys.session_counter(tenant, manifest.session_id)], args=[expect_sha, m])
        if res[0] != b"ok":
            self._release(tenant, adds, now)
            raise StaleManifest(f"manifest of {tenant}/{manifest.session_id} changed meanwhile")
        self._release(tenant, drops, now)
        return Committed(int(res[1]), manifest_tag(m))

    def _buckets(self, tenant: str, refs: list[BlockRef]) -> list[list[BlockRef]]:
        """`refs` grouped by bucket (one script each)."""
        groups: dict[str, list[BlockRef]] = {}
        for r in refs:
            groups.setdefault(self.keys.block_counter(tenant, r), []).append(r)
        return list(groups.values())

    def _run_refs(self, op: str, tenant: str, groups: list[list[BlockRef]], data: dict[bytes, bytes],
                  now: int) -> list:
        """One REFS script per bucket group (each atomic on its own): pipelined on one node; one call after
        another on a Cluster (redis-py's cluster pipeline refuses scripts; each call follows MOVED/ASK)."""
        cluster = isinstance(self.client, RedisCluster)
        pipe = None if cluster else self.client.pipeline(transaction=False)
        out = []
        for refs in groups:
            args: list = [op, now, self.ttl_s]
            if op == "add":
                for r in refs:
                    args += [r.content, data.get(r.key, b"")]
            keys = [self.keys.block_counter(tenant, refs[0])] + [self.block_key(tenant, r) for r in refs]
            out.append(self._refs(keys=keys, args=args, client=pipe or self.client))
        return out if cluster or not groups else pipe.execute()

    def _take(self, tenant: str, refs: list[BlockRef], data: dict[bytes, bytes], now: int) -> None:
        """Take one reference to each of `refs` (creating absent blocks from `data`): all or nothing. A
        refused bucket writes nothing; the others are released again and BlockRefused is raised."""
        groups = self._buckets(tenant, refs)
        taken, conflicts, missing = [], [], []
        for group, res in zip(groups, self._run_refs("add", tenant, groups, data, now)):
            if res[0] == b"ok":
                taken += group
                continue
            for item in res:
                kind, _, i = item.decode().partition(":")
                (conflicts if kind == "conflict" else missing).append(group[int(i)])
        if conflicts or missing:
            self._release(tenant, taken, now)
            raise BlockRefused(conflicts, missing)

    def _release(self, tenant: str, refs: list[BlockRef], now: int) -> None:
        """Release one reference to each of `refs` (a block whose count reaches 0 is deleted)."""
        self._run_refs("drop", tenant, self._buckets(tenant, refs), {}, now)

    def delete_session(self, tenant: str, session_id: str) -> bool:
        """Remove the session and release its blocks; True if it existed. A corrupt manifest is deleted too
        (its blocks are then left to `collect`)."""
        key = self.session_key(tenant, session_id)
        for _ in range(5):
            raw = self.client.hget(key, F_MANIFEST)
            try:
                refs = self.manifest_of(raw, tenant, session_id).blocks if raw is not None else []
            except ContainerError:
                refs = []
            sha = manifest_tag(raw) if raw is not None else "*"
            res = int(self._delete(keys=[key, self.keys.session_counter(tenant, session_id)], args=[sha]))
            if res >= 0:
                if res:
                    self._release(tenant, refs, int(time.time()))
                return bool(res)
        raise StaleManifest(f"manifest of {tenant}/{session_id} keeps changing; delete not done")

    def collect(self, grace_s: float = 600.0) -> dict[str, int]:
        """Set every block's reference count to the number of manifests (and public registry entries)
        listing it and delete blocks none lists, leaving alone blocks referenced within `grace_s` before
        the sweep began (see the module doc). {"fixed": counts set, "deleted": blocks removed}.

        Scans every manifest and block of the namespace: an operator's tool and a periodic sweep, not a hot path."""
        cutoff = int(time.time() - grace_s)
        counts: Counter = Counter()
        for key in self.client.scan_iter(match=self.keys.session_pattern(), count=500):
            raw = self.client.hget(key, F_MANIFEST)
            tenant = self.keys.session_of(key.decode())[0]
            try:
                m = SessionManifest.decode(raw) if raw is not None else None
            except ContainerError:
                continue
            for r in (m.blocks if m else []):
                counts[self.block_key(tenant, r)] += 1
        for digests in self.public_prefixes().values():  # a registered public prefix holds one reference each
            for d in digests:
                counts[self.block_key("", BlockRef(d, bytes(32), True))] += 1
        done = Counter()
        for key in self.client.scan_iter(match=self.keys.block_pattern, count=500):
            k = key.decode()
            want = counts.get(k, 0)
            if int(self.client.hget(key, "r") or 0) != want:
                done[int(self._collect(keys=[self.keys.counter_of_block(k), k], args=[want, cutoff]))] += 1
        return {"fixed": done[1], "deleted": done[2]}

    # ---- public prefixes -------------------------------------------------------------------------------
    def publish(self, refs: list[BlockRef], data: dict[bytes, bytes]) -> bool:
        """Register a public prefix (its blocks, in order, all public) holding one reference to each block;
        False if it was registered already. Raises BlockRefused like `commit`."""
        if not refs or not all(r.public for r in refs):
            raise ValueError("a public prefix lists one or more public blocks")
        pid, keys = refs[-1].key.hex(), [self.keys.registry_key, self.keys.registry_counter]
        if self.client.hexists(keys[0], pid):
            return False
        now = int(time.time())
        self._take("", refs, data, now)
        if int(self._publish(keys=keys, args=[pid, b"".join(r.key for r in refs)])):
            return True
        self._release("", refs, now)
        return False

    def unpublish(self, prefix_id: str) -> bool:
        raw = self._unpublish(keys=[self.keys.registry_key, self.keys.registry_counter], args=[prefix_id])
        if not raw:
            return False
        self._release("", [BlockRef(raw[i:i + 32], bytes(32), True) for i in range(0, len(raw), 32)],
                      int(time.time()))
        return True

    def public_prefixes(self) -> dict[str, list[bytes]]:
        """Every registered public prefix: id -> its blocks' key digests, in order."""
        return {k.decode(): [v[i:i + 32] for i in range(0, len(v), 32)]
                for k, v in self.client.hgetall(self.keys.registry_key).items()}

    # ---- reading sizes and listing -------------------------------------------------------------------
    def session_bytes(self, tenant: str, session_id: str, refs: list[BlockRef]) -> int:
        """Bytes needed to hold the session alone: its stored record plus every block `refs` lists (shared
        ones too), in one round trip."""
        pipe = self.client.pipeline(transaction=False)
        pipe.hstrlen(self.session_key(tenant, session_id), F_MANIFEST)
        for r in refs:
            key = self.block_key(tenant, r)
            pipe.hstrlen(key, "d")
            pipe.hstrlen(key, "c")
        return sum(int(v) for v in pipe.execute())

    def list_sessions(self, tenant: str, cursor: int = 0, limit: int = 50) -> tuple[int, list[tuple[SessionManifest, int]]]:
        """One page of a tenant's sessions: (next cursor, 0 at the end; [(manifest, record bytes)]).

        SCAN over the tenant's key pattern (on a Cluster: each master in turn, the cursor naming the master),
        so a page may hold fewer than `limit` sessions and the order is Redis's; every session present for
        the whole listing appears at least once (on a Cluster: while its masters do not change). Manifests
        are read in one pipelined round trip per page."""
        pattern = self.keys.session_pattern(tenant)
        keys: list[bytes] = []
        while True:
            cursor, batch = self._scan(cursor, pattern, max(limit, 10))
            keys += batch
            if cursor == 0 or len(keys) >= limit:
                break
        pipe = self.client.pipeline(transaction=False)
        for k in keys:
            pipe.hget(k, F_MANIFEST)
        out = []
        for raw in pipe.execute():
            if raw is None:  # deleted between SCAN and HGET
                continue
            manifest = SessionManifest.decode(raw)
            if manifest.tenant == tenant:
                out.append((manifest, len(raw)))
        return int(cursor), out

    def _scan(self, cursor: int, pattern: str, count: int) -> tuple[int, list[bytes]]:
        """One SCAN step; on a Cluster the cursor also names the master (in the order of their names)."""
        if not isinstance(self.client, RedisCluster):
            return self.client.scan(cursor=cursor, match=pattern, count=count)
        nodes = sorted(self.client.get_primaries(), key=lambda n: n.name)
        idx, node_cursor = cursor % _NODES, cursor // _NODES
        if idx >= len(nodes):
            return 0, []
        cur, keys = self.client.scan(cursor=node_cursor, match=pattern, count=count, target_nodes=nodes[idx])
        cur = int(cur[nodes[idx].name])
        return (cur * _NODES + idx if cur else (idx + 1) % len(nodes)), keys

    def stats(self) -> dict[str, int]:
        """Totals over every scope: {"bytes", "sessions", "blocks"}."""
        return self._sum(list(self.client.scan_iter(match=self.keys.counter_pattern, count=500)))

    def tenant_stats(self, tenant: str | None) -> dict[str, int]:
        """{"bytes", "sessions", "blocks"} of one tenant's scope (None: the public scope): the sum of its
        buckets' counters, one pipelined round trip."""
        return self._sum(self.keys.counter_keys(tenant))

    def _sum(self, keys: list) -> dict[str, int]:
        pipe = self.client.pipeline(transaction=False)
        for k in keys:
            pipe.hmget(k, list(_FIELDS))
        total = dict.fromkeys(_FIELDS, 0)
        for row in pipe.execute() if keys else []:
            for name, v in zip(_FIELDS, row):
                total[name] += int(v or 0)
        return total

    def ping(self) -> bool:
        """True when Redis answers."""
        try:
            return bool(self.client.ping())
        except (redis.RedisError, OSError):
            return False


def manifest_tag(raw: bytes) -> str:
    """What Lua's redis.sha1hex gives: a compare-and-set tag for the manifest, not a storage identity."""
    return hashlib.sha1(raw).hexdigest()
