"""`kvstash bench dedup` on real redis-servers and a real Redis Cluster: `unique_bytes` counts what the sessions'
records list (each record, and every listed block once by content), so it equals what Redis holds when one tenant
shares blocks, and stays positive and below the separate total whatever the prefix, own part, window or block size
(the old formula subtracted an assumed prefix and went negative when the own part was shorter than the window);
runs of the same sessions are compared on their block bytes (records carry timestamps); and the bench's
per-session path on a real engine reads every session on the engine thread and restores it bit-exactly."""

import dataclasses
import random
import uuid

import redis

from kvstore.storage import RedisTier
from services.bench.dedup import byte_figures, scenario, unique_bytes
from services.runtime.redis_url import redis_client
from services.wire import KvSource
from tests.kvstore.tiers.test_redis_tier import _data, _m, _ref
from tests.services.worker.test_session_store import SYSTEM, make_engine


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


def _at(m, t: float):
    """`m` with both its timestamps at `t`."""
    return dataclasses.replace(m, created_at=t, updated_at=t)


def test_runs_of_the_same_sessions_hold_equal_blocks_and_records_that_differ_by_their_timestamps(
        redis_server, redis_cluster):
    """A manifest carries its creation and update times as JSON numbers with as many decimal digits as the float
    needs, so two runs of the same sessions (here one node, then a Cluster) store records a few bytes apart (a
    two-session SmolLM2 run once showed totals of 12,088,096 and 12,088,094): runs compare on `block_bytes`."""
    short, long = 1733419999.5, 1733419999.1234567
    assert len(repr(long)) - len(repr(short)) == 6
    shared, own_a, own_b, tail_a, tail_b = _ref(1), _ref(2), _ref(3), _ref(4), _ref(5)
    rows = []
    for url, t in ((redis_server.url, short), (redis_cluster.url, long)):
        tier = RedisTier(redis_client(url, 10.0), namespace="d" + uuid.uuid4().hex[:8])
        records = [_at(_m("a", blocks=[shared, own_a, tail_a]), t), _at(_m("b", blocks=[shared, own_b, tail_b]), t)]
        for m in records:
            tier.commit_session(m, [], _data(m.blocks))
        rows.append(byte_figures(tier, records))
    one, cluster = rows
    for r in rows:
        assert r["redis_bytes"] == r["unique_bytes"] == r["record_bytes"] + r["block_bytes"], r
    assert one["block_bytes"] == cluster["block_bytes"]
    assert cluster["record_bytes"] - one["record_bytes"] == 2 * 2 * 6  # two records, two timestamps each
    assert cluster["redis_bytes"] - one["redis_bytes"] == 2 * 2 * 6


def test_the_bench_scenario_reads_each_session_on_the_engine_thread_and_restores_it_exactly(
        tiny_model_dir, redis_server, redis_cluster):
    """The bench's per-session path on a real engine: call, the device KV read, offload, restore asserted
    bit-exact. It once read the session from the caller's thread right after the call's DoneEvent, which the
    engine sends before releasing the session: caught between its maps, the session was read back cold from
    Redis, with no device cache. Every session and run here must come back exact, one node and Cluster alike."""
    rng = random.Random(11)
    owns = [[rng.randrange(1000, 20000) for _ in range(16)] for _ in range(6)]
    rows = {}
    for where, url in (("single", redis_server.url), ("cluster", redis_cluster.url)):
        eng = make_engine(tiny_model_dir, url)
        try:
            rows[where] = scenario(eng, "one-tenant", SYSTEM, owns)  # raises unless every restore is exact
        finally:
            eng.close()
    for r in rows.values():
        assert r["kv_sources"] == {KvSource.NEW: 1, KvSource.PREFIX: 5}, r  # later sessions adopt the prefix
        assert r["redis_bytes"] == r["unique_bytes"] < r["separate_bytes"], r  # one tenant: stored once
        assert r["shared_bytes"] > 0, r
    assert rows["single"]["block_bytes"] == rows["cluster"]["block_bytes"]
