"""`kvstash bench dedup`'s `unique_bytes` on a real redis-server: it counts what the sessions' records list (each
record, and every listed block once by content), so it equals what Redis holds when one tenant shares blocks, and
stays positive and below the separate total whatever the prefix, own part, window or block size (the old formula
subtracted an assumed prefix and went negative when the own part was shorter than the window)."""

import uuid

import redis

from kvstore.storage import RedisTier
from services.bench.dedup import unique_bytes
from tests.kvstore.tiers.test_redis_tier import _data, _m, _ref


def test_unique_bytes_count_each_listed_block_once_and_equal_what_one_tenant_stores(redis_server):
    tier = RedisTier(redis.Redis.from_url(redis_server.url), namespace="d" + uuid.uuid4().hex[:8])
    shared, own_a, own_b, tail_a, tail_b = _ref(1), _ref(2), _ref(3), _ref(4), _ref(5)
    a = _m("a", blocks=[shared, own_a, tail_a])
    b = _m("b", blocks=[shared, own_b, tail_b])  # the own part is only a tail for neither: any cut works
    for m in (a, b):
        tier.commit_session(m, [], _data(m.blocks))
    unique, shared_bytes = unique_bytes(tier, [a, b])
    separate = sum(tier.session_bytes(m.tenant, m.session_id, m.blocks) for m in (a, b))
    assert unique == tier.stats()["bytes"]  # one tenant: every block stored once, records once each
    assert shared_bytes == tier.session_bytes("acme", "nobody", [shared])  # the one block both list
    assert 0 < unique == separate - shared_bytes
    c = _m("c", blocks=[own_a, tail_a])  # content listed again under another session: still counted once
    tier.commit_session(c, [], _data(c.blocks))
    unique3, _ = unique_bytes(tier, [a, b, c])
    assert unique3 == tier.stats()["bytes"]
