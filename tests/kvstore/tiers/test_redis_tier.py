"""RedisTier against a real redis-server: manifests, shared blocks with reference counts, exact stats."""

import hashlib
import random
import time
import uuid
from collections import Counter

import pytest
import redis
from redis.crc import key_slot

from kvstore.codec.container import ContainerError
from kvstore.tiers.key_layout import BUCKETS, KeyLayout, SlotTags
from kvstore.tiers.manifest import BlockRef, SessionManifest
from kvstore.tiers.redis_tier import BlockRefused, RedisTier, StaleManifest
from services.runtime.redis_server import RedisServer


@pytest.fixture
def tier(redis_server):
    client = redis.Redis.from_url(redis_server.url)
    return RedisTier(client, namespace="t" + uuid.uuid4().hex[:8])  # a fresh namespace per test


def _ref(i: int, public: bool = False, content: int | None = None) -> BlockRef:
    return BlockRef(key=i.to_bytes(32, "little"), content=(i if content is None else content).to_bytes(32, "big"),
                    public=public)


def _data(refs) -> dict[bytes, bytes]:
    return {r.key: bytes([r.key[0]]) * (100 + r.key[0]) for r in refs}


def _m(sid, n=20, tenant="acme", blocks=()):
    return SessionManifest(tenant=tenant, session_id=sid, tokens=list(range(n)), schedule=[n - 1],
                           kv_tokens=n - 1 if blocks else 0, model_fingerprint="f" * 64, quant_spec="int4",
                           created_at=1.0, updated_at=2.0, blocks=list(blocks))


def _stored(tier) -> dict:
    """What is really in Redis: bytes, sessions and blocks per the tier's accounting rules, and block counts."""
    c, ns = tier.client, tier.namespace
    total, sessions, blocks, refs = 0, 0, 0, {}
    for key in c.scan_iter(f"{ns}:session:*"):
        total += sum(c.hstrlen(key, f) for f in c.hkeys(key))
        sessions += 1
    for key in c.scan_iter(f"{ns}:block:*"):
        total += c.hstrlen(key, "d") + c.hstrlen(key, "c")
        blocks += 1
        refs[key.decode()] = int(c.hget(key, "r"))
    total += sum(len(k) + len(v) for k, v in c.hgetall(tier.keys.registry_key).items())
    return {"bytes": total, "sessions": sessions, "blocks": blocks, "refs": refs}


def _true_refs(tier, live: dict) -> dict:
    counts = Counter()
    for (tenant, _), m in live.items():
        for r in m.blocks:
            counts[tier.block_key(tenant, r)] += 1
    return dict(counts)


def test_commit_and_read_back_bit_exact(tier):
    refs = [_ref(1), _ref(2), _ref(3, public=True)]
    held = tier.commit_session(_m("s1", blocks=refs), [], _data(refs)).bytes
    assert tier.get_manifest("acme", "s1") == _m("s1", blocks=refs)
    assert tier.get_blocks("acme", refs) == [_data(refs)[r.key] for r in refs]
    assert held == len(_m("s1", blocks=refs).encode())
    assert tier.session_bytes("acme", "s1", refs) == held + sum(len(d) + 32 for d in _data(refs).values())
    tag = "{" + SlotTags.tag(KeyLayout.slot("acme", KeyLayout.session_bucket("s1"))) + "}"
    assert tier.session_key("acme", "s1") == f"{tier.namespace}:session:{tag}:acme:s1"
    assert tier.block_key("acme", refs[2]).endswith(f"}}:~public:{refs[2].key.hex()}")


def test_shared_blocks_are_stored_once_and_survive_one_owner_s_deletion(tier):
    shared = [_ref(1), _ref(2)]
    a, b = shared + [_ref(10)], shared + [_ref(20)]
    tier.commit_session(_m("a", blocks=a), [], _data(a))
    tier.commit_session(_m("b", blocks=b), [], {r.key: d for r, d in zip(b, _data(b).values()) if r not in shared})
    st = _stored(tier)
    assert st["blocks"] == 4 and st["refs"][tier.block_key("acme", shared[0])] == 2
    assert tier.delete_session("acme", "a") is True
    assert tier.get_blocks("acme", b) == [_data(b)[r.key] for r in b]  # b is intact
    assert tier.get_blocks("acme", [_ref(10)]) == [None]  # a's own block is collected
    assert tier.delete_session("acme", "b") is True
    assert _stored(tier) == {"bytes": 0, "sessions": 0, "blocks": 0, "refs": {}}
    assert tier.stats() == {"bytes": 0, "sessions": 0, "blocks": 0}


def test_conflicting_or_missing_blocks_are_refused_and_nothing_is_written(tier):
    tier.commit_session(_m("a", blocks=[_ref(1)]), [], _data([_ref(1)]))
    before = _stored(tier)
    other = _ref(1, content=99)  # same key, other bits: must not share
    with pytest.raises(BlockRefused) as e:
        tier.commit_session(_m("b", blocks=[other, _ref(2)]), [], {})
    assert e.value.conflicts == [other] and e.value.missing == [_ref(2)]
    pub = _ref(7, public=True)
    with pytest.raises(BlockRefused):
        tier.commit_session(_m("c", blocks=[pub, _ref(1, content=98)]), [], _data([pub]))
    assert _stored(tier) == before and tier.get_manifest("acme", "b") is None
    assert tier.stats() == {k: before[k] for k in ("bytes", "sessions", "blocks")}


def test_stale_manifests_are_refused(tier):
    done = tier.commit_session(_m("a"), [])
    with pytest.raises(StaleManifest):
        tier.commit_session(_m("a", n=30), [], expect_sha="0" * 40)
    assert tier.get_manifest("acme", "a") == _m("a")
    tier.commit_session(_m("a", n=30), [], expect_sha=done.sha1)  # the writer's own tag is current
    assert tier.get_manifest("acme", "a") == _m("a", n=30)


def test_stats_and_reference_counts_track_every_operation_exactly(tier):
    rng = random.Random(1)
    pool = [_ref(i, public=i % 5 == 0) for i in range(1, 16)]
    live: dict = {}
    for step in range(150):
        tenant, sid = rng.choice(["acme", "zeta"]), f"s{rng.randrange(6)}"
        if rng.random() < 0.75:
            blocks = rng.sample(pool, rng.randrange(0, 6))
            prev = live.get((tenant, sid))
            tier.commit_session(_m(sid, n=rng.randrange(2, 60), tenant=tenant, blocks=blocks),
                        prev.blocks if prev else [], _data(blocks))
            live[(tenant, sid)] = _m(sid, tenant=tenant, blocks=blocks)
        else:
            assert tier.delete_session(tenant, sid) == ((tenant, sid) in live)
            live.pop((tenant, sid), None)
        st = _stored(tier)
        assert tier.stats() == {k: st[k] for k in ("bytes", "sessions", "blocks")}, f"step {step}"
        assert st["refs"] == _true_refs(tier, live), f"step {step}"
    parts = [tier.tenant_stats(t) for t in ("acme", "zeta", None)]
    assert tier.stats() == {k: sum(p[k] for p in parts) for k in parts[0]}


def test_collect_repairs_leaked_counts_and_removes_orphans(tier):
    refs = [_ref(1), _ref(2, public=True)]
    tier.commit_session(_m("a", blocks=refs), [], _data(refs))
    tier.client.hincrby(tier.block_key("acme", refs[1]), "r", 3)  # counts leaked by crashed writers
    orphan = _ref(5, public=True)
    tier._take("acme", [orphan], _data([orphan]), int(time.time()))  # a writer died before its manifest commit
    assert tier.collect(grace_s=3600) == {"fixed": 0, "deleted": 0}  # referenced too recently to touch
    time.sleep(1.1)  # the sweep's cutoff (whole seconds) passes the blocks' last reference
    assert tier.collect(grace_s=0) == {"fixed": 1, "deleted": 1}
    st = _stored(tier)
    assert st["refs"] == {tier.block_key("acme", r): 1 for r in refs}
    assert tier.stats() == {k: st[k] for k in ("bytes", "sessions", "blocks")}


def test_ttl_applies_to_blocks_never_to_manifests(redis_server):
    tier = RedisTier(redis.Redis.from_url(redis_server.url), namespace="ttl" + uuid.uuid4().hex[:6], ttl_s=500)
    tier.commit_session(_m("a", blocks=[_ref(1)]), [], _data([_ref(1)]))
    assert 0 < tier.client.ttl(tier.block_key("acme", _ref(1))) <= 500
    assert tier.client.ttl(tier.session_key("acme", "a")) == -1


def test_every_script_touches_one_cluster_slot_and_a_tenant_spans_the_slot_ring(tier):
    ks = tier.keys
    slot = key_slot(tier.session_key("acme", "s1").encode())
    assert slot == key_slot(ks.session_counter("acme", "s1").encode())
    for ref in (_ref(1), _ref(2, public=True), _ref(77)):
        assert key_slot(tier.block_key("acme", ref).encode()) == key_slot(ks.block_counter("acme", ref).encode())
    assert key_slot(ks.registry_key.encode()) == key_slot(ks.registry_counter.encode())
    assert key_slot(tier.block_key("acme", _ref(2, public=True)).encode()) == \
        key_slot(tier.block_key("zeta", _ref(2, public=True)).encode())  # public blocks: one place for all
    slots = sorted(key_slot(k.encode()) for k in ks.counter_keys("acme"))
    step = 16384 // BUCKETS
    assert len(set(slots)) == BUCKETS and {(s - slots[0]) % step for s in slots} == {0}  # evenly spaced
    assert len({key_slot(tier.session_key("acme", f"s{i}").encode()) for i in range(200)}) > BUCKETS // 2


def test_slot_tags_are_fixed_by_crc16():
    """Stored key names depend on this table: it must never change between builds."""
    tags = SlotTags.table()
    assert len(tags) == 16384 and all(key_slot(f"x{{{t}}}y".encode()) == s for s, t in enumerate(tags))
    assert (tags[0], tags[1], tags[16383]) == ("3560", "22179", "39296")
    assert hashlib.sha256(",".join(tags).encode()).hexdigest()[:16] == "1502e2ec8c9525fc"


def test_tenants_are_separate_scopes(tier):
    tier.commit_session(_m("same", tenant="a", blocks=[_ref(1)]), [], {_ref(1).key: b"A" * 50})
    tier.commit_session(_m("same", tenant="b", blocks=[_ref(1)]), [], {_ref(1).key: b"B" * 50})
    assert tier.get_blocks("a", [_ref(1)]) == [b"A" * 50] and tier.get_blocks("b", [_ref(1)]) == [b"B" * 50]


def test_corrupt_misfiled_and_garbage_manifests_are_detected(tier):
    tier.commit_session(_m("c"), [])
    key = tier.session_key("acme", "c")
    raw = bytearray(tier.client.hget(key, "m"))
    raw[-1] ^= 0xFF
    tier.client.hset(key, "m", bytes(raw))
    with pytest.raises(ContainerError, match="checksum"):
        tier.get_manifest("acme", "c")
    tier.client.hset(tier.session_key("acme", "y"), "m", _m("x").encode())
    with pytest.raises(ContainerError, match="belongs to acme/x"):
        tier.get_manifest("acme", "y")
    tier.client.hset(tier.session_key("acme", "g"), "m", b"\x80\x04\x95 not a container at all, 40+ bytes long")
    with pytest.raises(ContainerError, match="bad magic"):
        tier.get_manifest("acme", "g")
    assert tier.delete_session("acme", "g") is True  # a corrupt record can still be deleted


@pytest.mark.parametrize("tenant,sid", [("", "s"), ("a b", "s"), ("t", "x" * 129), ("t", "s}:x"), ("{t}", "s")])
def test_ids_are_validated(tier, tenant, sid):
    with pytest.raises(ValueError, match="must be 1..128"):
        tier.session_key(tenant, sid)


def test_invalid_manifest_is_refused_before_writing(tier):
    bad = _m("bad")
    bad.kv_tokens = 3
    with pytest.raises(ContainerError, match="not a boundary"):
        tier.commit_session(bad, [])
    with pytest.raises(ValueError, match="must be 1..128"):
        tier.commit_session(_m("bad", tenant="no spaces"), [])
    assert tier.stats() == {"bytes": 0, "sessions": 0, "blocks": 0}


def test_survives_a_redis_restart_and_reports_down(tmp_path):
    """Lua scripts are flushed by a restart; the tier must reload them (and ping must say False when down)."""
    with RedisServer(data_dir=str(tmp_path), appendonly=True) as server:
        tier = RedisTier(redis.Redis.from_url(server.url, socket_timeout=2), namespace="restart")
        tier.commit_session(_m("r1", blocks=[_ref(1)]), [], _data([_ref(1)]))
        server.restart()
        assert tier.get_blocks("acme", [_ref(1)]) == [_data([_ref(1)])[_ref(1).key]]
        tier.commit_session(_m("r2"), [])
        assert tier.delete_session("acme", "r1") is True
        st = _stored(tier)
        assert tier.stats() == {k: st[k] for k in ("bytes", "sessions", "blocks")} and st["sessions"] == 1
        server.kill()
        assert tier.ping() is False


def test_list_sessions_pages_through_one_tenant_only(tier):
    for tenant, n in (("acme", 23), ("other", 5)):
        for i in range(n):
            tier.commit_session(SessionManifest(tenant, f"s{i}", [1, 2, 3], [3], 0, "fp", "fp", 1.0, 2.0), [])
    seen, cursor, pages = [], 0, 0
    while True:
        cursor, page = tier.list_sessions("acme", cursor, limit=5)
        seen += [m.session_id for m, size in page if size > 0]
        pages += 1
        if cursor == 0:
            break
    assert sorted(set(seen)) == sorted(f"s{i}" for i in range(23)) and pages > 1
    assert all(m.tenant == "other" for m, _ in tier.list_sessions("other", 0, 100)[1])
    assert tier.list_sessions("nobody", 0, 10) == (0, [])


def test_public_prefixes_hold_their_blocks_across_tenants(tier):
    pub = [_ref(1, public=True), _ref(2, public=True)]
    assert tier.publish(pub, _data(pub)) is True
    assert tier.publish(pub, {}) is False  # registered once
    assert tier.public_prefixes() == {pub[-1].key.hex(): [r.key for r in pub]}
    for tenant in ("a", "b"):
        own = [_ref(10)]
        tier.commit_session(_m("s", tenant=tenant, blocks=pub + own), [], _data(own))
    st = _stored(tier)
    assert st["refs"][tier.block_key("x", pub[0])] == 3 and st["blocks"] == 4  # stored once, shared by both
    assert tier.stats() == {k: st[k] for k in ("bytes", "sessions", "blocks")}
    tier.delete_session("a", "s")
    tier.delete_session("b", "s")
    assert tier.collect(grace_s=0) == {"fixed": 0, "deleted": 0}  # the registry still references them
    assert tier.get_blocks("a", pub) == [_data(pub)[r.key] for r in pub]
    assert tier.unpublish(pub[-1].key.hex()) is True and tier.unpublish(pub[-1].key.hex()) is False
    st = _stored(tier)
    assert st == {"bytes": 0, "sessions": 0, "blocks": 0, "refs": {}}
    assert tier.stats() == {"bytes": 0, "sessions": 0, "blocks": 0}
    with pytest.raises(ValueError, match="public blocks"):
        tier.publish([_ref(3)], {})
