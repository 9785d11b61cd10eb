"""`RedisTier`: sessions in Redis — one hash per session plus atomically maintained byte statistics.

Keys:
- `{ns}:sess:{<tenant>}:<session_id>`: a HASH with fields `m` (manifest container) and `kv` (KV container).
  The braces make the tenant a Redis Cluster hash tag.
- `{ns}:stats:{<tenant>}`: a HASH per tenant with `bytes` (sum of the lengths of the tenant's session
  hashes' field values) and `sessions` (number of the tenant's session hashes). It shares the session
  keys' hash tag, so every script touches keys of one Redis Cluster slot; `stats()` sums the tenants.

Invariants:
- Every write or delete that changes a session hash runs as ONE Lua script that also applies the size
  delta (from HSTRLEN before and after) and the existence change to the stats hash, so `stats()` always
  equals the true totals, whatever the interleaving of clients.
- `put_session` writes manifest and KV together atomically: a reader never sees a KV without the manifest
  describing it.
- Tenant and session ids match `[A-Za-z0-9._-]{1,128}` (ValueError otherwise); a manifest read back is
  checked to belong to the key it was read from (ContainerError otherwise).
- The client must be created with `decode_responses=False` (values are binary).
"""

from __future__ import annotations

import redis

from kvstore.codec.container import ContainerError
from kvstore.tiers.manifest import SessionManifest, validate_id

F_MANIFEST = b"m"
F_KV = b"kv"

# KEYS[1] session hash, KEYS[2] stats hash.
# ARGV[1] = n, then n (field, value) pairs to set, then the fields to delete.
# Returns the bytes the session hash holds afterwards.
_UPDATE_LUA = """
local key, stats = KEYS[1], KEYS[2]
local existed = redis.call('EXISTS', key)
local n = tonumber(ARGV[1])
local delta = 0
for i = 1, n do
  local f, v = ARGV[2 * i], ARGV[2 * i + 1]
  delta = delta + string.len(v) - redis.call('HSTRLEN', key, f)
  redis.call('HSET', key, f, v)
end
for i = 2 * n + 2, #ARGV do
  delta = delta - redis.call('HSTRLEN', key, ARGV[i])
  redis.call('HDEL', key, ARGV[i])
end
local exists = redis.call('EXISTS', key)
if delta ~= 0 then redis.call('HINCRBY', stats, 'bytes', delta) end
if exists ~= existed then redis.call('HINCRBY', stats, 'sessions', exists - existed) end
local total = 0
for _, f in ipairs(redis.call('HKEYS', key)) do total = total + redis.call('HSTRLEN', key, f) end
return total
"""

# KEYS[1] session hash, KEYS[2] stats hash. Returns 1 if the session existed.
_DELETE_LUA = """
local key, stats = KEYS[1], KEYS[2]
if redis.call('EXISTS', key) == 0 then return 0 end
local total = 0
for _, f in ipairs(redis.call('HKEYS', key)) do total = total + redis.call('HSTRLEN', key, f) end
redis.call('DEL', key)
if total ~= 0 then redis.call('HINCRBY', stats, 'bytes', -total) end
redis.call('HINCRBY', stats, 'sessions', -1)
return 1
"""

# KEYS[1] session hash. Returns the bytes it holds.
_BYTES_LUA = """
local total = 0
for _, f in ipairs(redis.call('HKEYS', KEYS[1])) do total = total + redis.call('HSTRLEN', KEYS[1], f) end
return total
"""


class RedisTier:
    def __init__(self, client: redis.Redis, namespace: str = "kvstash"):
        if not isinstance(namespace, str) or not namespace:
            raise ValueError("namespace must be a non-empty string")
        self.client = client
        self.namespace = namespace
        self._stats_pattern = f"{namespace}:stats:*"
        self._update = client.register_script(_UPDATE_LUA)
        self._delete = client.register_script(_DELETE_LUA)
        self._bytes = client.register_script(_BYTES_LUA)

    def session_key(self, tenant: str, session_id: str) -> str:
        validate_id(tenant, "tenant")
        validate_id(session_id, "session id")
        return f"{self.namespace}:sess:{{{tenant}}}:{session_id}"

    def stats_key(self, tenant: str) -> str:
        validate_id(tenant, "tenant")
        return f"{self.namespace}:stats:{{{tenant}}}"

    def _write(self, tenant: str, key: str, sets: list[tuple[bytes, bytes]], deletes: list[bytes]) -> int:
        args: list = [len(sets)]
        for field, value in sets:
            args += [field, value]
        args += deletes
        return int(self._update(keys=[key, self.stats_key(tenant)], args=args))

    def put_manifest(self, manifest: SessionManifest) -> int:
        """Write field `m` only (a stored KV is kept). Returns the bytes this session now holds."""
        key = self.session_key(manifest.tenant, manifest.session_id)
        return self._write(manifest.tenant, key, [(F_MANIFEST, manifest.encode())], [])

    def put_session(self, manifest: SessionManifest, kv: bytes | None) -> int:
        """Write `m` and `kv` in one atomic step (`kv=None` deletes the field). Returns the bytes held."""
        key = self.session_key(manifest.tenant, manifest.session_id)
        m = manifest.encode()
        if kv is None:
            return self._write(manifest.tenant, key, [(F_MANIFEST, m)], [F_KV])
        if not isinstance(kv, (bytes, bytearray, memoryview)):
            raise TypeError(f"kv must be bytes or None, not {type(kv).__name__}")
        return self._write(manifest.tenant, key, [(F_MANIFEST, m), (F_KV, bytes(kv))], [])

    def get_manifest(self, tenant: str, session_id: str) -> SessionManifest | None:
        """The stored manifest, None if there is none; ContainerError if it is corrupt or misfiled."""
        raw = self.client.hget(self.session_key(tenant, session_id), F_MANIFEST)
        if raw is None:
            return None
        m = SessionManifest.decode(raw)
        if (m.tenant, m.session_id) != (tenant, session_id):
            raise ContainerError(f"manifest stored under {tenant}/{session_id} belongs to {m.tenant}/{m.session_id}")
        return m

    def get_kv(self, tenant: str, session_id: str) -> bytes | None:
        """The stored KV container bytes (not decoded), None if there is none."""
        return self.client.hget(self.session_key(tenant, session_id), F_KV)

    def drop_kv(self, tenant: str, session_id: str) -> None:
        """Delete the stored KV (the manifest stays)."""
        self._write(tenant, self.session_key(tenant, session_id), [], [F_KV])

    def delete_session(self, tenant: str, session_id: str) -> bool:
        """Remove the session hash; True if it existed."""
        key = self.session_key(tenant, session_id)
        return bool(self._delete(keys=[key, self.stats_key(tenant)], args=[]))

    def session_bytes(self, tenant: str, session_id: str) -> int:
        """Bytes of the session's field values (0 if it does not exist)."""
        return int(self._bytes(keys=[self.session_key(tenant, session_id)], args=[]))

    def list_sessions(self, tenant: str, cursor: int = 0, limit: int = 50) -> tuple[int, list[tuple[SessionManifest, int]]]:
        """One page of a tenant's sessions: (next cursor, 0 at the end; [(manifest, bytes held)]).

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
            self._bytes(keys=[k], args=[], client=pipe)
        raw = pipe.execute()
        out = []
        for i in range(len(keys)):
            m, size = raw[2 * i], raw[2 * i + 1]
            if m is None:  # deleted between SCAN and HGET
                continue
            manifest = SessionManifest.decode(m)
            if manifest.tenant == tenant:
                out.append((manifest, int(size)))
        return int(cursor), out

    def stats(self) -> dict[str, int]:
        """{"bytes": total field-value bytes of all sessions, "sessions": number of session hashes}."""
        total = {"bytes": 0, "sessions": 0}
        keys = list(self.client.scan_iter(match=self._stats_pattern, count=500))
        pipe = self.client.pipeline(transaction=False)
        for k in keys:
            pipe.hmget(k, ["bytes", "sessions"])
        for b, n in pipe.execute():
            total["bytes"] += int(b or 0)
            total["sessions"] += int(n or 0)
        return total

    def tenant_stats(self, tenant: str) -> dict[str, int]:
        """{"bytes", "sessions"} of one tenant (one round trip)."""
        b, n = self.client.hmget(self.stats_key(tenant), ["bytes", "sessions"])
        return {"bytes": int(b or 0), "sessions": int(n or 0)}

    def ping(self) -> bool:
        """True when Redis answers."""
        try:
            return bool(self.client.ping())
        except (redis.RedisError, OSError):
            return False
