"""`RedisTier`: sessions and their KV blocks in Redis — manifests, content-addressed blocks with reference
counts, and atomically maintained byte statistics.

Keys (`ns` = namespace; braces are Redis Cluster hash tags):
- `{ns}:sess:{<tenant>}:<session_id>`: HASH, field `m` = the session's manifest (token history, schedule,
  block records). Never given an expiry: it is the durable truth.
- `{ns}:blk:{<tenant>}:<hex>` (private) or `{ns}:blk:{~public}:<hex>` (public prefixes): one HASH per block
  holding payload and metadata together (see kvstore/tiers/redis_scripts.py), stored once however many
  sessions reference it. With `ttl_s` > 0 blocks expire unless referenced again, so Redis may evict KV
  under `maxmemory-policy volatile-lru` but never a manifest.
- `{ns}:stats:{<tenant>}` and `{ns}:stats:{~public}`: bytes, sessions and blocks of each scope.
- `{ns}:public:{~public}`: HASH, prefix id (hex of its last chain hash) -> its blocks' key digests; each
  entry holds one reference to each of its blocks (prefixes an operator marked public).

Invariants:
- Every write runs as Lua scripts that touch one slot each and also apply their byte/count deltas, so the
  stats always equal what is stored (`bytes` = the session hashes' field bytes + the blocks' d and c bytes).
- A block's reference count is the number of manifests listing it. `commit` takes the new manifest's
  references and releases the previous one's in one script per scope (public scope first on adds, last on
  drops), so a crash between scopes can only leave a public count too high; `collect` repairs counts and
  removes unreferenced blocks after a grace period.
- A block is shared only when its stored content hash equals the writer's ("conflict" otherwise), so a
  session's KV restored from shared blocks is bit-identical to what it stored.
- Ids match `[A-Za-z0-9._-]{1,128}`; a manifest read back must belong to the key it was read from.
- The client must be created with `decode_responses=False` (values are binary).
"""

from __future__ import annotations

import hashlib
import time
from collections import Counter
from dataclasses import dataclass

import redis

from kvstore.codec.container import ContainerError
from kvstore.tiers import redis_scripts as lua
from kvstore.tiers.manifest import BlockRef, SessionManifest, validate_id

PUBLIC_TAG = "~public"  # cannot collide with a tenant id ([A-Za-z0-9._-])
F_MANIFEST = b"m"


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
    def __init__(self, client: redis.Redis, namespace: str = "kvstash", ttl_s: int = 0):
        if not isinstance(namespace, str) or not namespace:
            raise ValueError("namespace must be a non-empty string")
        self.client, self.namespace, self.ttl_s = client, namespace, int(ttl_s)
        self._commit = client.register_script(lua.COMMIT)
        self._refs = client.register_script(lua.REFS)
        self._delete = client.register_script(lua.DELETE)
        self._collect = client.register_script(lua.COLLECT)
        self._publish = client.register_script(lua.PUBLISH)
        self._unpublish = client.register_script(lua.UNPUBLISH)

    # ---- keys ------------------------------------------------------------------------------------
    def session_key(self, tenant: str, session_id: str) -> str:
        validate_id(tenant, "tenant")
        validate_id(session_id, "session id")
        return f"{self.namespace}:sess:{{{tenant}}}:{session_id}"

    def stats_key(self, tenant: str | None) -> str:
        """The stats hash of a tenant's scope, or of the public scope (tenant None)."""
        return f"{self.namespace}:stats:{{{PUBLIC_TAG if tenant is None else validate_id(tenant, 'tenant')}}}"

    def block_key(self, tenant: str, ref: BlockRef) -> str:
        """Where a block lives: its tenant's scope, or the public scope (then `tenant` is not used)."""
        tag = PUBLIC_TAG if ref.public else validate_id(tenant, "tenant")
        return f"{self.namespace}:blk:{{{tag}}}:{ref.key.hex()}"

    # ---- manifests ---------------------------------------------------------------------------------
    def get_manifest(self, tenant: str, session_id: str) -> SessionManifest | None:
        """The stored manifest, None if there is none; ContainerError if it is corrupt or misfiled."""
        record = self.get_record(tenant, session_id)
        return None if record is None else record[0]

    def get_record(self, tenant: str, session_id: str) -> tuple[SessionManifest, str] | None:
        """(manifest, its compare-and-set tag for `commit`), or None; ContainerError as `get_manifest`."""
        raw = self.client.hget(self.session_key(tenant, session_id), F_MANIFEST)
        return None if raw is None else (self._manifest(raw, tenant, session_id), _sha1(raw))

    @staticmethod
    def _manifest(raw: bytes, tenant: str, session_id: str) -> SessionManifest:
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
        """Write `manifest`, reference its blocks and release those of `previous` (the manifest it replaces).

        `data` maps a block key digest to its container, for blocks that may be absent. Raises BlockRefused
        (nothing written in that scope) or StaleManifest."""
        tenant, data = manifest.tenant, data or {}
        key = self.session_key(tenant, manifest.session_id)
        m = manifest.encode()
        new, old = Counter(manifest.blocks), Counter(previous)
        adds, drops = list((new - old).elements()), list((old - new).elements())
        pub_adds = [r for r in adds if r.public]
        now = int(time.time())
        if pub_adds:
            self._run_refs("add", tenant, pub_adds, data, now)
        priv_adds, priv_drops = [r for r in adds if not r.public], [r for r in drops if not r.public]
        args: list = [expect_sha, m, len(priv_adds), len(priv_drops), now, self.ttl_s]
        for r in priv_adds:
            args += [r.content, data.get(r.key, b"")]
        keys = [key, self.stats_key(tenant)] + [self.block_key(tenant, r) for r in priv_adds + priv_drops]
        res = self._commit(keys=keys, args=args)
        if res[0] != b"ok":
            if pub_adds:  # undo the public references this commit took
                self._run_refs("drop", tenant, pub_adds, {}, now)
            if res[0] == b"stale":
                raise StaleManifest(f"manifest of {tenant}/{manifest.session_id} changed meanwhile")
            self._refused(res, priv_adds)
        pub_drops = [r for r in drops if r.public]
        if pub_drops:
            self._run_refs("drop", tenant, pub_drops, {}, now)
        return Committed(int(res[1]), _sha1(m))

    def _run_refs(self, op: str, tenant: str, refs: list[BlockRef], data: dict[bytes, bytes], now: int) -> None:
        args: list = [op, now, self.ttl_s]
        if op == "add":
            for r in refs:
                args += [r.content, data.get(r.key, b"")]
        res = self._refs(keys=[self.stats_key(None)] + [self.block_key(tenant, r) for r in refs], args=args)
        if res[0] != b"ok":
            self._refused(res, refs)

    @staticmethod
    def _refused(res: list, refs: list[BlockRef]) -> None:
        conflicts, missing = [], []
        for item in res:
            kind, _, i = item.decode().partition(":")
            (conflicts if kind == "conflict" else missing).append(refs[int(i)])
        raise BlockRefused(conflicts, missing)

    def delete_session(self, tenant: str, session_id: str) -> bool:
        """Remove the session and release its blocks; True if it existed. A corrupt manifest is deleted too
        (its blocks are then left to `collect`)."""
        key = self.session_key(tenant, session_id)
        for _ in range(5):
            raw = self.client.hget(key, F_MANIFEST)
            try:
                refs = self._manifest(raw, tenant, session_id).blocks if raw is not None else []
            except ContainerError:
                refs = []
            sha = _sha1(raw) if raw is not None else "*"
            priv = [r for r in refs if not r.public]
            keys = [key, self.stats_key(tenant)] + [self.block_key(tenant, r) for r in priv]
            res = int(self._delete(keys=keys, args=[sha]))
            if res >= 0:
                pub = [r for r in refs if r.public]
                if res and pub:
                    self._run_refs("drop", tenant, pub, {}, int(time.time()))
                return bool(res)
        raise StaleManifest(f"manifest of {tenant}/{session_id} keeps changing; delete not done")

    def collect(self, grace_s: float = 600.0) -> dict[str, int]:
        """Repair reference counts from the manifests (and the public registry) and delete blocks none lists
        (after `grace_s`).

        Scans every manifest and block of the namespace: an operator's tool and a periodic sweep, not a hot path."""
        counts: Counter = Counter()
        for key in self.client.scan_iter(match=f"{self.namespace}:sess:*", count=500):
            raw = self.client.hget(key, F_MANIFEST)
            tenant = key.decode().split("{", 1)[1].split("}", 1)[0]
            try:
                m = SessionManifest.decode(raw) if raw is not None else None
            except ContainerError:
                continue
            for r in (m.blocks if m else []):
                counts[self.block_key(tenant, r)] += 1
        for digests in self.public_prefixes().values():  # a registered public prefix holds one reference each
            for d in digests:
                counts[self.block_key("", BlockRef(d, bytes(32), True))] += 1
        fixed = deleted = 0
        now = int(time.time())
        for key in self.client.scan_iter(match=f"{self.namespace}:blk:*", count=500):
            k = key.decode()
            tag = k.split("{", 1)[1].split("}", 1)[0]
            have = int(self.client.hget(key, "r") or 0)
            want = counts.get(k, 0)
            if have == want:
                continue
            stats = self.stats_key(None if tag == PUBLIC_TAG else tag)
            deleted += int(self._collect(keys=[stats, k], args=[want, grace_s, now]))
            fixed += 1
        return {"fixed": fixed, "deleted": deleted}

    # ---- public prefixes -------------------------------------------------------------------------------
    @property
    def public_key(self) -> str:
        return f"{self.namespace}:public:{{{PUBLIC_TAG}}}"

    def publish(self, refs: list[BlockRef], data: dict[bytes, bytes]) -> bool:
        """Register a public prefix (its blocks, in order, all public) holding one reference to each block;
        False if it was registered already. Raises BlockRefused like `commit`."""
        if not refs or not all(r.public for r in refs):
            raise ValueError("a public prefix lists one or more public blocks")
        pid = refs[-1].key.hex()
        args: list = [pid, b"".join(r.key for r in refs), int(time.time()), self.ttl_s]
        for r in refs:
            args += [r.content, data.get(r.key, b"")]
        res = self._publish(keys=[self.stats_key(None), self.public_key] + [self.block_key("", r) for r in refs],
                            args=args)
        if res[0] not in (b"ok", b"exists"):
            self._refused(res, refs)
        return res[0] == b"ok"

    def unpublish(self, prefix_id: str) -> bool:
        raw = self.client.hget(self.public_key, prefix_id)
        if raw is None:
            return False
        refs = [BlockRef(raw[i:i + 32], bytes(32), True) for i in range(0, len(raw), 32)]
        return bool(self._unpublish(keys=[self.stats_key(None), self.public_key] +
                                    [self.block_key("", r) for r in refs], args=[prefix_id]))

    def public_prefixes(self) -> dict[str, list[bytes]]:
        """Every registered public prefix: id -> its blocks' key digests, in order."""
        return {k.decode(): [v[i:i + 32] for i in range(0, len(v), 32)]
                for k, v in self.client.hgetall(self.public_key).items()}

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

        SCAN over the tenant's key pattern (the tenant id has no glob characters), so a page may hold
        fewer than `limit` sessions and the order is Redis's; every session present for the whole
        listing appears at least once. Manifests are read in one pipelined round trip per page."""
        validate_id(tenant, "tenant")
        pattern = f"{self.namespace}:sess:{{{tenant}}}:*"
        keys: list[bytes] = []
        while True:
            cursor, batch = self.client.scan(cursor=cursor, match=pattern, count=max(limit, 10))
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

    def stats(self) -> dict[str, int]:
        """Totals over every scope: {"bytes", "sessions", "blocks"}."""
        total = {"bytes": 0, "sessions": 0, "blocks": 0}
        keys = list(self.client.scan_iter(match=f"{self.namespace}:stats:*", count=500))
        pipe = self.client.pipeline(transaction=False)
        for k in keys:
            pipe.hmget(k, ["bytes", "sessions", "blocks"])
        for row in pipe.execute():
            for name, v in zip(total, row):
                total[name] += int(v or 0)
        return total

    def tenant_stats(self, tenant: str | None) -> dict[str, int]:
        """{"bytes", "sessions", "blocks"} of one tenant's scope (None: the public scope), one round trip."""
        row = self.client.hmget(self.stats_key(tenant), ["bytes", "sessions", "blocks"])
        return {name: int(v or 0) for name, v in zip(("bytes", "sessions", "blocks"), row)}

    def ping(self) -> bool:
        """True when Redis answers."""
        try:
            return bool(self.client.ping())
        except (redis.RedisError, OSError):
            return False


def _sha1(raw: bytes) -> str:
    """What Lua's redis.sha1hex gives: a compare-and-set tag for the manifest, not a storage identity."""
    return hashlib.sha1(raw).hexdigest()
