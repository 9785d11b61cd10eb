"""`ConversationIndex`: which session holds a stateless HTTP conversation, so its next turn continues it.

A client of the OpenAI API resends the whole conversation each turn. After a transparent (no explicit
session) chat call, the index maps the conversation *as the client will resend it* — the request's
messages plus the assistant reply — to the session that produced it. A later request whose messages
begin with such a conversation (cut after an assistant turn) is served by a *fork* of that session
(`GenerateCall.fork_of` with `extends`): the worker checks, token by token, that the session's history
begins the request's rendering, copies its history and KV into a new session (stored blocks shared by
reference), and prefills only the rest. The conversation's own session is never changed, so its entry
stays true: a regenerated reply, or an edited later turn, forks it again.

The index lives in Redis (the service's `redis.url`), so every gateway replica, and a restarted gateway,
finds the same conversations. Per tenant: a HASH `ns:conv:{<tenant>}` (conversation key -> session id) and
a sorted set `ns:convlru:{<tenant>}` (conversation key by last use); both carry the tenant as their hash
tag, so on a Redis Cluster they share a slot and `remember` updates them in one atomic script.

Invariants:
- Conversation keys are deterministic digests of the tenant and the length-prefixed (role, content)
  fields (`hash_fields`, never `hash()`); a tenant's keys live under its own name, so a tenant never finds
  another tenant's session.
- Each tenant holds at most `capacity` conversations (least recently used first out); `remember` returns
  the session ids that fell out, named by no remaining entry, for the caller to delete — so per-request
  sessions do not accumulate without bound (capacity 0: no reuse, each session is deleted after its call).
- The index is an optimisation: Redis failing to answer makes a lookup a miss and a `remember` a no-op
  (logged); it never fails a request and never loses data (an unindexed session expires with the
  session TTL when one is set, or is deleted by id).
"""

from __future__ import annotations

import logging
import time

from kvstore.digest import prefix_hashes

log = logging.getLogger(__name__)

# KEYS: the tenant's hash and sorted set. ARGV: conversation key, session id, now, capacity, ttl seconds.
# Returns the session ids of the conversations pushed out that no entry names any more.
_REMEMBER = """
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('ZADD', KEYS[2], ARGV[3], ARGV[1])
local gone = {}
local over = redis.call('ZCARD', KEYS[2]) - tonumber(ARGV[4])
if over > 0 then
  for _, k in ipairs(redis.call('ZRANGE', KEYS[2], 0, over - 1)) do
    local sid = redis.call('HGET', KEYS[1], k)
    redis.call('HDEL', KEYS[1], k)
    redis.call('ZREM', KEYS[2], k)
    if sid then table.insert(gone, sid) end
  end
end
local live = {}
for _, v in ipairs(redis.call('HVALS', KEYS[1])) do live[v] = true end
local out = {}
for _, sid in ipairs(gone) do
  if not live[sid] then table.insert(out, sid); live[sid] = true end
end
if tonumber(ARGV[5]) > 0 then
  redis.call('EXPIRE', KEYS[1], ARGV[5])
  redis.call('EXPIRE', KEYS[2], ARGV[5])
end
return out
"""


def conversation_key(tenant: str, messages: list[dict[str, str]]) -> bytes:
    return conversation_keys(tenant, messages, [len(messages)])[0]


def conversation_keys(tenant: str, messages: list[dict[str, str]], cuts: list[int]) -> list[bytes]:
    """`conversation_key(tenant, messages[:j])` for each j of `cuts`, hashing `messages` once."""
    fields: list[str] = [tenant]
    for m in messages:
        fields += [m["role"], m["content"]]
    order = sorted(set(cuts))
    keys = dict(zip(order, prefix_hashes(fields, [1 + 2 * j for j in order], person=b"kvstash-conv")))
    return [keys[j] for j in cuts]


class ConversationIndex:
    def __init__(self, client, namespace: str, capacity: int, ttl_s: int = 0):
        """`client`: an asyncio Redis client (`services.runtime.redis_url.async_redis_client`); `ttl_s`: the
        entries' expiry, renewed on use (0: none) — the sessions' own TTL."""
        self.client, self.ns, self.capacity, self.ttl_s = client, namespace, capacity, ttl_s
        self._remember = client.register_script(_REMEMBER)

    def _keys(self, tenant: str) -> list[str]:
        return [f"{self.ns}:conv:{{{tenant}}}", f"{self.ns}:convlru:{{{tenant}}}"]

    async def find(self, tenant: str, messages: list[dict[str, str]],
                   shorter_than: int | None = None) -> tuple[bytes, str, int] | None:
        """The longest remembered conversation that `messages` extend (cut after an assistant turn, leaving at
        least one new message; with `shorter_than`, of fewer messages than that), as (key, session id, its
        number of messages), or None."""
        if self.capacity <= 0:
            return None
        top = len(messages) - 1 if shorter_than is None else min(len(messages) - 1, shorter_than - 1)
        cuts = [j for j in range(top, 0, -1) if messages[j - 1]["role"] == "assistant"]
        if not cuts:
            return None
        keys = conversation_keys(tenant, messages, cuts)
        conv, lru = self._keys(tenant)
        try:
            found = await self.client.hmget(conv, keys)
            for key, sid, cut in zip(keys, found, cuts):
                if sid is not None:
                    await self.client.zadd(lru, {key: time.time()}, xx=True)
                    return key, sid.decode(), cut
        except Exception as e:  # noqa: BLE001 - the index is an optimisation: a miss
            log.warning("conversation lookup for %s failed (%s): treated as a miss", tenant, e)
        return None

    async def remember(self, tenant: str, messages: list[dict[str, str]], reply: str, session_id: str) -> list[str]:
        """Record that `session_id` holds `messages` + the assistant `reply`; returns session ids to delete
        (the tenant's least recently used conversations over capacity)."""
        if self.capacity <= 0:
            return [session_id]
        key = conversation_key(tenant, [*messages, {"role": "assistant", "content": reply}])
        try:
            gone = await self._remember(keys=self._keys(tenant),
                                        args=[key, session_id, time.time(), self.capacity, self.ttl_s])
        except Exception as e:  # noqa: BLE001 - not indexed: the session is not continued transparently
            log.warning("could not remember a conversation of %s (%s)", tenant, e)
            return []
        return [g.decode() for g in gone]

    async def forget(self, tenant: str, key: bytes) -> None:
        conv, lru = self._keys(tenant)
        try:
            await self.client.hdel(conv, key)
            await self.client.zrem(lru, key)
        except Exception as e:  # noqa: BLE001 - a stale entry is a miss at worst (NotFound, then forgotten)
            log.warning("could not forget a conversation of %s (%s)", tenant, e)

    async def sessions(self, tenant: str) -> int:
        """Conversations the tenant holds."""
        return int(await self.client.hlen(self._keys(tenant)[0]))
