"""`ConversationIndex` on a real redis-server (and a real Redis Cluster): continuation lookup, tenant scoping,
the bounded lifecycle of per-request sessions, and an index shared by gateways and surviving their restarts."""

import asyncio
import uuid

import pytest

from services.gateway.conversations import ConversationIndex, conversation_key
from services.runtime.redis_url import async_redis_client

SYS = {"role": "system", "content": "be brief"}


def u(text):
    return {"role": "user", "content": text}


def a(text):
    return {"role": "assistant", "content": text}


def with_index(url: str, capacity: int, body, namespace: str | None = None, ttl_s: int = 0):
    """Run `body(index)` against a fresh namespace (or `namespace`) of the Redis at `url`."""
    async def main():
        idx = ConversationIndex(async_redis_client(url, timeout_s=5), namespace or "conv" + uuid.uuid4().hex[:8],
                                capacity, ttl_s)
        try:
            return await body(idx)
        finally:
            await idx.client.aclose()
    return asyncio.run(main())


def test_a_conversation_is_found_by_its_extension_only_within_its_tenant(redis_server):
    async def body(idx):
        assert await idx.remember("alpha", [SYS, u("hi")], "hello", "s1") == []
        turn2 = [SYS, u("hi"), a("hello"), u("how are you?")]
        key, sid, cut = await idx.find("alpha", turn2)
        assert sid == "s1" and cut == 3 and key == conversation_key("alpha", turn2[:3])
        assert await idx.find("beta", turn2) is None
        assert await idx.find("alpha", [SYS, u("hi"), a("hullo"), u("x")]) is None
        assert await idx.find("alpha", [SYS, u("hi")]) is None  # nothing new to continue with
        await idx.forget("alpha", key)
        assert await idx.find("alpha", turn2) is None
    with_index(redis_server.url, 4, body)


def test_every_turn_stays_findable_for_edits_and_regenerations(redis_server):
    """A continuation is a fork: the earlier conversation's session is unchanged, so its entry stays; the
    longest remembered conversation wins."""
    async def body(idx):
        await idx.remember("alpha", [u("a")], "b", "s1")
        turn2 = [u("a"), a("b"), u("c")]
        assert (await idx.find("alpha", turn2))[1] == "s1"
        assert await idx.remember("alpha", turn2, "d", "s2") == []
        assert await idx.sessions("alpha") == 2
        assert (await idx.find("alpha", [*turn2[:2], u("c, edited")]))[1] == "s1"  # an edited turn 2 forks s1
        turn3 = [*turn2, a("d"), u("e")]
        assert (await idx.find("alpha", turn3))[1:] == ("s2", 4)
        # s2 could not be forked (its reply re-tokenized differently): the turn before it, s1
        assert (await idx.find("alpha", turn3, shorter_than=4))[1:] == ("s1", 2)
        assert await idx.find("alpha", turn3, shorter_than=2) is None
    with_index(redis_server.url, 4, body)


def test_sessions_beyond_capacity_are_returned_for_deletion_least_recently_used_first(redis_server):
    async def body(idx):
        gone = [g for i in range(5) for g in await idx.remember("alpha", [u(str(i))], "ok", f"s{i}")]
        assert gone == ["s0", "s1", "s2"] and await idx.sessions("alpha") == 2
        assert (await idx.find("alpha", [u("3"), a("ok"), u("more")]))[1] == "s3"  # s3 is now the most recent
        assert await idx.remember("alpha", [u("5")], "ok", "s5") == ["s4"]
    with_index(redis_server.url, 2, body)

    async def none(idx):
        assert await idx.remember("alpha", [u("x")], "y", "s9") == ["s9"]  # no reuse: deleted after its call
        assert await idx.find("alpha", [u("x"), a("y"), u("z")]) is None
    with_index(redis_server.url, 0, none)


def test_the_index_is_shared_by_gateways_and_outlives_them(redis_server):
    """Two indexes on one namespace (two gateway replicas, or one gateway before and after a restart) see
    the same conversations; entries carry the sessions' TTL."""
    ns = "conv" + uuid.uuid4().hex[:8]

    async def first(idx):
        await idx.remember("alpha", [u("q")], "r", "s1")

    async def second(idx):
        assert (await idx.find("alpha", [u("q"), a("r"), u("next")]))[1] == "s1"
        assert 0 < await idx.client.ttl(f"{ns}:conv:{{alpha}}") <= 3600
    with_index(redis_server.url, 4, first, namespace=ns, ttl_s=3600)
    with_index(redis_server.url, 4, second, namespace=ns, ttl_s=3600)


def test_an_unreachable_redis_is_a_miss_never_an_error():
    async def body(idx):
        assert await idx.find("alpha", [u("q"), a("r"), u("next")]) is None
        assert await idx.remember("alpha", [u("q")], "r", "s1") == []
        await idx.forget("alpha", b"k")
    with_index("redis://127.0.0.1:1/0", 4, body)


@pytest.mark.e2e
def test_on_a_redis_cluster_a_tenant_s_entries_share_a_slot(redis_cluster):
    async def body(idx):
        for i in range(6):
            await idx.remember("alpha", [u(str(i))], "ok", f"s{i}")
        assert (await idx.find("alpha", [u("5"), a("ok"), u("more")]))[1] == "s5"
        assert await idx.sessions("alpha") == 4
    with_index(redis_cluster.url, 4, body)


def test_keys_are_the_digest_of_the_tenant_and_length_prefixed_turns():
    from kvstore.digest import hash_fields
    from services.gateway.conversations import conversation_keys

    msgs = [SYS, u("hi"), a("hello"), u("more")]
    assert conversation_key("t", msgs[:3]) == hash_fields(["t", "system", "be brief", "user", "hi", "assistant",
                                                            "hello"], person=b"kvstash-conv")
    assert conversation_keys("t", msgs, [3, 1, 3]) == [conversation_key("t", msgs[:j]) for j in (3, 1, 3)]


def test_keys_are_length_prefixed():
    assert conversation_key("t", [u("ab"), u("c")]) != conversation_key("t", [u("a"), u("bc")])
    assert conversation_key("t", [u("x")]) == conversation_key("t", [u("x")])
