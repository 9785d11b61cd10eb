"""RedisTier and SessionStore on a real Redis Cluster (3 masters + 3 replicas): commit/read/delete/collect/stats
work through redis-py's RedisCluster, no script ever crosses slots (CROSSSLOT would raise and fail the test),
and one tenant's sessions spread over every master (the pre-issue-17 layout, written by the legacy writer in
the same process, is the baseline: one master held all of it)."""
import json

from kvstore.tiers.key_layout import BUCKETS
from kvstore.tiers.redis_tier import RedisTier
from services.runtime.redis_cluster import master_usage
from services.runtime.redis_url import redis_client
from tests.kvstore.tiers.test_legacy_layout import legacy_commit
from tests.kvstore.tiers.test_redis_tier import _data, _m, _ref
from tests.kvstore.tiers.test_store import BLOCK, PREFIX, make_store, manifest, session

SESSIONS = 300


def test_commit_read_delete_collect_on_a_cluster(redis_cluster):
    tier = RedisTier(redis_client(redis_cluster.url, 5.0), namespace="clt")
    refs = [_ref(1), _ref(2), _ref(3, public=True)]
    held = tier.commit_session(_m("s1", blocks=refs), [], _data(refs)).bytes
    assert tier.get_manifest("acme", "s1") == _m("s1", blocks=refs)
    assert tier.get_blocks("acme", refs) == [_data(refs)[r.key] for r in refs]
    assert tier.session_bytes("acme", "s1", refs) == held + sum(len(d) + 32 for d in _data(refs).values())
    assert tier.stats()["sessions"] == 1
    assert tier.publish(refs[2:], {}) is True and tier.unpublish(refs[2].key.hex()) is True
    assert tier.delete_session("acme", "s1") is True
    assert tier.get_blocks("acme", refs) == [None, None, None]
    assert tier.collect() == {"fixed": 0, "deleted": 0}
    assert tier.stats() == {"bytes": 0, "sessions": 0, "blocks": 0}


def test_one_tenant_spreads_over_every_master_with_exact_dedup(redis_cluster):
    client = redis_client(redis_cluster.url, 10.0)
    tier = RedisTier(client, namespace="spread")
    store = make_store(tier)
    saved, states = {}, {}
    for i in range(SESSIONS):  # every session starts with PREFIX (4 shared blocks), then its own tokens
        sid = f"s{i}"
        tokens, schedule, state = session(40 + (i % 5) * 16, i + 1)
        saved[sid] = store.save(manifest(sid, tokens, schedule), state, [], None)
        if i % 60 == 0:
            states[sid] = state

    spread = master_usage(client, "spread:*")
    for sid, s in saved.items():  # the baseline: the same records with the legacy layout (one {tenant} slot)
        legacy_commit(client, "legacy", tier.get_manifest("acme", sid),
                      dict(zip([r.key for r in s.blocks], tier.get_blocks("acme", s.blocks))))
    legacy = master_usage(client, "legacy:*")
    print(json.dumps({"tenant_sessions": SESSIONS, "spread": [u.__dict__ for u in spread],
                      "legacy": [u.__dict__ for u in legacy]}))
    assert len(spread) == 3 and all(u.keys > 0 for u in spread)
    per_master = [u.bytes for u in spread]
    assert max(per_master) / min(per_master) <= 1.25, spread
    assert sorted(u.keys > 0 for u in legacy) == [False, False, True]  # the baseline: one master holds all

    shared = [r for r in saved["s0"].blocks if all(r in s.blocks for s in saved.values())]
    unique = list({r for s in saved.values() for r in s.blocks})
    assert len(shared) == len(PREFIX) // BLOCK  # stored once for all 300 sessions
    assert all(int(client.hget(tier.block_key("acme", r), "r")) == SESSIONS for r in shared)
    manifests = sum(client.hstrlen(tier.session_key("acme", sid), "m") for sid in saved)
    exact = {"bytes": manifests + sum(st.size for st in tier.check("acme", unique)), "sessions": SESSIONS,
             "blocks": len(unique)}
    assert tier.tenant_stats("acme") == exact and tier.stats() == exact

    fresh = make_store(tier)  # nothing warm: every block comes from its master
    for sid, state in states.items():
        assert fresh.restore("acme", saved[sid].blocks, saved[sid].kv_tokens).state.equals(state)
    listed, cursor = set(), 0
    while True:
        cursor, page = tier.list_sessions("acme", cursor, limit=64)
        listed |= {m.session_id for m, _ in page}
        if cursor == 0:
            break
    assert listed == set(saved)

    for i, sid in enumerate(saved):
        if i % 2:
            assert store.delete("acme", sid) is True
    assert tier.collect(grace_s=0) == {"fixed": 0, "deleted": 0}  # the counts were right all along
    assert all(int(client.hget(tier.block_key("acme", r), "r")) == SESSIONS // 2 for r in shared)
    for i, sid in enumerate(saved):
        if i % 2 == 0:
            assert store.delete("acme", sid) is True
    assert tier.stats() == {"bytes": 0, "sessions": 0, "blocks": 0}
    assert sum(u.keys for u in master_usage(client, "spread:*")) == BUCKETS  # only the (zeroed) counters of the scope remain
