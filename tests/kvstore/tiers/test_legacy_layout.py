"""LayoutMigration against a real redis-server (and a real Redis Cluster): sessions and public prefixes written
with the pre-issue-17 key layout (every key of a tenant in its `{tenant}` slot) by a tiny legacy writer are
read back through the new layout bit for bit, with exact counters and reference counts, and nothing is lost."""

import time
import uuid

import redis

from kvstore.tiers.legacy_layout import LayoutMigration, LegacyLayout, MigrationReport
from kvstore.tiers.redis_tier import RedisTier
from services.runtime.redis_url import redis_client
from tests.kvstore.tiers.test_redis_tier import _data, _m, _ref, _stored, _true_refs
from tests.kvstore.tiers.test_store import make_store, manifest, session


def legacy_commit(client, ns: str, m, data: dict[bytes, bytes]) -> None:
    """What builds before issue 17 stored for a committed session (their COMMIT script's effect)."""
    old = LegacyLayout(ns)
    raw = m.encode()
    client.hset(old.session_key(m.tenant, m.session_id), "m", raw)
    client.hincrby(old.stats_key(m.tenant), "bytes", len(raw))
    client.hincrby(old.stats_key(m.tenant), "sessions", 1)
    for r in m.blocks:
        _legacy_ref(client, old, m.tenant, r, data)


def legacy_publish(client, ns: str, refs, data: dict[bytes, bytes]) -> None:
    old = LegacyLayout(ns)
    client.hset(old.registry_key, refs[-1].key.hex(), b"".join(r.key for r in refs))
    for r in refs:
        _legacy_ref(client, old, "", r, data)


def _legacy_ref(client, old: LegacyLayout, tenant: str, r, data) -> None:
    key, stats = old.block_key(tenant, r), old.stats_key(None if r.public else tenant)
    if client.exists(key):
        client.hincrby(key, "r", 1)
        return
    client.hset(key, mapping={"d": data[r.key], "c": r.content, "r": 1, "t": int(time.time())})
    client.hincrby(stats, "bytes", len(data[r.key]) + 32)
    client.hincrby(stats, "blocks", 1)


def _legacy_keys(client, ns: str) -> list:
    return [k for p in LegacyLayout(ns).patterns for k in client.scan_iter(match=p)]


def test_store_sessions_of_the_legacy_layout_restore_bit_exact_after_migration(redis_server):
    tier = RedisTier(redis.Redis.from_url(redis_server.url), namespace="mig" + uuid.uuid4().hex[:8])
    store = make_store(tier)
    originals = {}
    for i, sid in enumerate(("a", "b", "c")):  # a shared prefix: blocks referenced by several sessions
        tokens, schedule, state = session(60 + 10 * i, i + 1)
        saved = store.save(manifest(sid, tokens, schedule), state, [], None)
        m = tier.get_manifest("acme", sid)
        originals[sid] = (m, state, dict(zip([r.key for r in saved.blocks], tier.get_blocks("acme", saved.blocks))))
    for sid in originals:  # only the legacy copy stays
        assert tier.delete_session("acme", sid)
    for m, _, data in originals.values():
        legacy_commit(tier.client, tier.namespace, m, data)
    lost = originals["c"][0]  # one session's legacy KV was evicted: it must keep its history
    tier.client.delete(LegacyLayout(tier.namespace).block_key("acme", lost.blocks[-1]))
    assert tier.get_manifest("acme", "a") is None and tier.stats()["sessions"] == 0

    report = LayoutMigration(tier).run()
    assert (report.sessions, report.without_kv, report.corrupt) == (2, 1, 0) and report.purged > 0
    assert _legacy_keys(tier.client, tier.namespace) == []
    fresh = make_store(tier)  # nothing warm: every byte comes from Redis
    for sid in ("a", "b"):
        m, state, _ = originals[sid]
        assert tier.get_manifest("acme", sid) == m
        assert fresh.restore("acme", m.blocks, m.kv_tokens).state.equals(state)
    kept = tier.get_manifest("acme", "c")
    assert kept.tokens == lost.tokens and kept.schedule == lost.schedule and kept.blocks == [] and kept.kv_tokens == 0
    st = _stored(tier)
    assert tier.stats() == {k: st[k] for k in ("bytes", "sessions", "blocks")}
    assert st["refs"] == _true_refs(tier, {("acme", s): tier.get_manifest("acme", s) for s in originals})
    assert LayoutMigration(tier).run() == MigrationReport()  # done: later runs return at once


def _legacy_scene(tier) -> tuple[list, dict]:
    """Two tenants' sessions and one public prefix, written with the legacy layout; returns (pub, live)."""
    pub = [_ref(1, public=True), _ref(2, public=True)]
    legacy_publish(tier.client, tier.namespace, pub, _data(pub))
    live = {}
    for tenant in ("acme", "zeta"):
        for i in range(3):
            blocks = pub + [_ref(10 + i), _ref(20)]
            m = _m(f"s{i}", tenant=tenant, blocks=blocks)
            legacy_commit(tier.client, tier.namespace, m, _data(blocks))
            live[(tenant, f"s{i}")] = m
    return pub, live


def test_public_prefixes_and_shared_blocks_migrate_with_exact_counts(redis_server):
    tier = RedisTier(redis.Redis.from_url(redis_server.url), namespace="mig" + uuid.uuid4().hex[:8])
    pub, live = _legacy_scene(tier)
    newer = _m("s0", n=40, tenant="zeta")  # written in the new layout after the legacy copy: it wins
    newer.updated_at = 9.0
    tier.commit_session(newer, [])
    report = LayoutMigration(tier).run()
    assert (report.sessions, report.superseded, report.public_prefixes) == (5, 1, 1)
    live[("zeta", "s0")] = newer
    for (tenant, sid), m in live.items():
        assert tier.get_manifest(tenant, sid) == m
        assert tier.get_blocks(tenant, m.blocks) == [_data(m.blocks)[r.key] for r in m.blocks]
    assert tier.public_prefixes() == {pub[-1].key.hex(): [r.key for r in pub]}
    st = _stored(tier)
    want = _true_refs(tier, live)
    for r in pub:  # the registry entry holds one reference to each of its blocks
        want[tier.block_key("", r)] += 1
    assert st["refs"] == want and tier.stats() == {k: st[k] for k in ("bytes", "sessions", "blocks")}
    assert _legacy_keys(tier.client, tier.namespace) == []
    assert tier.collect(grace_s=0) == {"fixed": 0, "deleted": 0}


def test_migration_on_a_real_cluster_keeps_every_session(redis_cluster):
    """The legacy layout was Cluster-valid too (one slot per tenant): the migration runs on a Cluster."""
    tier = RedisTier(redis_client(redis_cluster.url, 5.0), namespace="migc" + uuid.uuid4().hex[:6])
    pub, live = _legacy_scene(tier)
    assert LayoutMigration(tier).run().sessions == len(live)
    for (tenant, sid), m in live.items():
        assert tier.get_manifest(tenant, sid) == m
        assert tier.get_blocks(tenant, m.blocks) == [_data(m.blocks)[r.key] for r in m.blocks]
    assert _legacy_keys(tier.client, tier.namespace) == []
    assert tier.stats()["sessions"] == len(live)
