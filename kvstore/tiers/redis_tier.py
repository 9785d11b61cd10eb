"""`RedisTier`: the cold tier. One Redis hash per session, and atomic byte accounting.

Keys:
    {ns}:sess:{<tenant>}:<session>   hash: field `m` = manifest container, field `kv` = KV container
    {ns}:stats                       hash: `bytes` = sum of all session field lengths, `sessions` = count

The braces around the tenant are a Redis Cluster hash tag (a tenant's sessions share a slot).
Every write and delete runs as one Lua script that also updates `{ns}:stats`, so the stats equal the
stored bytes exactly, whatever interleaving of workers and failures (a script is atomic).
The client must be created with `decode_responses=False`; values are never unpickled.
"""

from __future__ import annotations

import re

import redis

from kvstore.tiers.manifest import SessionManifest

ID_RE = re.compile(r"^[A-Za-z0-9._-]{1,128}$")

# KEYS[1] session hash, KEYS[2] stats hash; ARGV: field1, value1|"", del1 (0/1), field2, ...
# A field with del=1 is removed; otherwise set to value. Returns the session's total bytes after.
_PUT = """
local existed = redis.call('EXISTS', KEYS[1])
local delta = 0
for i = 1, #ARGV, 3 do
  local field, value, del = ARGV[i], ARGV[i + 1], ARGV[i + 2]
  delta = delta - redis.call('HSTRLEN', KEYS[1], field)
  if del == '1' then
    redis.call('HDEL', KEYS[1], field)
  else
    redis.call('HSET', KEYS[1], field, value)
    delta = delta + string.len(value)
  end
end
local exists = redis.call('EXISTS', KEYS[1])
redis.call('HINCRBY', KEYS[2], 'bytes', delta)
redis.call('HINCRBY', KEYS[2], 'sessions', exists - existed)
local total = 0
for _, f in ipairs(redis.call('HKEYS', KEYS[1])) do total = total + redis.call('HSTRLEN', KEYS[1], f) end
return total
"""

_DELETE = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
local total = 0
for _, f in ipairs(redis.call('HKEYS', KEYS[1])) do total = total + redis.call('HSTRLEN', KEYS[1], f) end
redis.call('DEL', KEYS[1])
redis.call('HINCRBY', KEYS[2], 'bytes', -total)
redis.call('HINCRBY', KEYS[2], 'sessions', -1)
return 1
"""


def check_id(kind: str, value: str) -> str:
    if not isinstance(value, str) or not ID_RE.match(value):
        raise ValueError(f"{kind} must be 1..128 characters of [A-Za-z0-9._-]")
    return value


class RedisTier:
    def __init__(self, client: redis.Redis, namespace: str = "kvstash"):
        self.client = client
        self.namespace = check_id("namespace", namespace)
        self.stats_key = f"{namespace}:stats"
        self._put = client.register_script(_PUT)
        self._delete = client.register_script(_DELETE)

    def session_key(self, tenant: str, session_id: str) -> str:
        return f"{self.namespace}:sess:{{{check_id('tenant', tenant)}}}:{check_id('session_id', session_id)}"

    def _write(self, tenant: str, session_id: str, fields: list[tuple[str, bytes | None]]) -> int:
        argv: list[bytes | str] = []
        for name, value in fields:
            argv += [name, value if value is not None else b"", "1" if value is None else "0"]
        return int(self._put(keys=[self.session_key(tenant, session_id), self.stats_key], args=argv))

    def put_manifest(self, manifest: SessionManifest) -> int:
        """Write the manifest (durable history) only; returns the bytes the session now holds."""
        return self._write(manifest.tenant, manifest.session_id, [("m", manifest.encode())])

    def put_session(self, manifest: SessionManifest, kv: bytes | None) -> int:
        """Write manifest and KV together, atomically (kv None removes the KV field)."""
        return self._write(manifest.tenant, manifest.session_id, [("m", manifest.encode()), ("kv", kv)])

    def get_manifest(self, tenant: str, session_id: str) -> SessionManifest | None:
        data = self.client.hget(self.session_key(tenant, session_id), "m")
        return None if data is None else SessionManifest.decode(data)

    def get_kv(self, tenant: str, session_id: str) -> bytes | None:
        return self.client.hget(self.session_key(tenant, session_id), "kv")

    def drop_kv(self, tenant: str, session_id: str) -> None:
        self._write(tenant, session_id, [("kv", None)])

    def delete_session(self, tenant: str, session_id: str) -> bool:
        return bool(self._delete(keys=[self.session_key(tenant, session_id), self.stats_key]))

    def session_bytes(self, tenant: str, session_id: str) -> int:
        key = self.session_key(tenant, session_id)
        pipe = self.client.pipeline(transaction=False)
        for field in ("m", "kv"):
            pipe.hstrlen(key, field)
        return sum(pipe.execute())

    def stats(self) -> dict[str, int]:
        raw = self.client.hgetall(self.stats_key)
        return {"bytes": int(raw.get(b"bytes", 0)), "sessions": int(raw.get(b"sessions", 0))}

    def ping(self) -> bool:
        try:
            return bool(self.client.ping())
        except redis.RedisError:
            return False
