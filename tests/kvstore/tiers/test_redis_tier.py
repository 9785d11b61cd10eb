"""RedisTier against a real redis-server."""

import random
import uuid

import pytest
import redis

from kvstore.codec.container import ContainerError
from kvstore.tiers.manifest import SessionManifest
from kvstore.tiers.redis_tier import RedisTier


@pytest.fixture
def tier(redis_server):
    client = redis.Redis.from_url(redis_server.url)
    ns = "t" + uuid.uuid4().hex[:8]  # a fresh namespace per test
    return RedisTier(client, namespace=ns)


def _m(sid, n=20, tenant="acme"):
    return SessionManifest(tenant=tenant, session_id=sid, tokens=list(range(n)), schedule=[n - 1], kv_tokens=n - 1,
                           model_fingerprint="f" * 64, quant_spec="int4", created_at=1.0, updated_at=2.0)


def _stored_bytes(tier):
    total = 0
    for key in tier.client.scan_iter(f"{tier.namespace}:sess:*"):
        total += sum(tier.client.hstrlen(key, f) for f in tier.client.hkeys(key))
    return total


def test_put_get_roundtrip_bit_exact(tier):
    kv = bytes(random.Random(0).randbytes(5000))
    held = tier.put_session(_m("s1"), kv)
    assert tier.get_manifest("acme", "s1") == _m("s1")
    assert tier.get_kv("acme", "s1") == kv
    assert held == tier.session_bytes("acme", "s1") == len(kv) + len(_m("s1").encode())
    assert tier.session_key("acme", "s1") == f"{tier.namespace}:sess:{{acme}}:s1"


def test_stats_track_every_operation_exactly(tier):
    rng = random.Random(1)
    live = set()
    for step in range(200):
        sid = f"s{rng.randrange(8)}"
        op = rng.choice(["put", "put", "manifest", "drop", "delete"])
        if op == "put":
            tier.put_session(_m(sid, n=rng.randrange(2, 60)), rng.randbytes(rng.randrange(0, 3000)))
            live.add(sid)
        elif op == "manifest":
            tier.put_manifest(_m(sid, n=rng.randrange(2, 60)))
            live.add(sid)
        elif op == "drop":
            tier.drop_kv("acme", sid)
        else:
            assert tier.delete_session("acme", sid) == (sid in live)
            live.discard(sid)
        stats = tier.stats()
        assert stats["bytes"] == _stored_bytes(tier), f"step {step} ({op})"
        assert stats["sessions"] == len(live)


def test_delete_removes_the_key(tier):
    tier.put_session(_m("gone"), b"kv")
    key = tier.session_key("acme", "gone")
    assert tier.client.exists(key) == 1
    assert tier.delete_session("acme", "gone") is True
    assert tier.client.exists(key) == 0
    assert tier.delete_session("acme", "gone") is False
    assert tier.get_manifest("acme", "gone") is None and tier.get_kv("acme", "gone") is None


def test_tenants_are_separate_keys(tier):
    tier.put_session(_m("same", tenant="a"), b"A")
    tier.put_session(_m("same", tenant="b"), b"B")
    assert tier.get_kv("a", "same") == b"A" and tier.get_kv("b", "same") == b"B"


def test_corrupt_manifest_is_detected(tier):
    tier.put_session(_m("c"), b"kv")
    key = tier.session_key("acme", "c")
    raw = bytearray(tier.client.hget(key, "m"))
    raw[-1] ^= 0xFF
    tier.client.hset(key, "m", bytes(raw))
    with pytest.raises(ContainerError, match="checksum"):
        tier.get_manifest("acme", "c")


@pytest.mark.parametrize("tenant,sid", [("", "s"), ("a b", "s"), ("t", "x" * 129), ("t", "s}:x"), ("{t}", "s")])
def test_ids_are_validated(tier, tenant, sid):
    with pytest.raises(ValueError, match="must be 1..128"):
        tier.session_key(tenant, sid)


def test_ping(tier):
    assert tier.ping() is True


# ---- field-level semantics, misfiled records, server restarts ------------------------------------------

from services.runtime.redis_server import RedisServer  # noqa: E402


def test_put_session_without_kv_and_drop_kv_adjust_stats(tier):
    tier.put_session(_m("a"), bytes(range(256)) * 10)
    assert tier.get_kv("acme", "a") == bytes(range(256)) * 10
    m_len = len(_m("a").encode())
    assert tier.put_session(_m("a"), None) == m_len  # kv None removes the field
    assert tier.get_kv("acme", "a") is None and tier.get_manifest("acme", "a") == _m("a")
    assert tier.stats() == {"bytes": m_len, "sessions": 1}
    tier.put_session(_m("a"), b"kv")
    assert tier.put_manifest(_m("a", n=30)) == len(_m("a", n=30).encode()) + 2  # the KV is kept
    tier.drop_kv("acme", "a")
    tier.drop_kv("acme", "a")  # idempotent
    assert tier.session_bytes("acme", "a") == len(_m("a", n=30).encode())
    assert tier.stats() == {"bytes": _stored_bytes(tier), "sessions": 1}


def test_missing_sessions(tier):
    assert tier.get_manifest("acme", "nope") is None and tier.get_kv("acme", "nope") is None
    assert tier.session_bytes("acme", "nope") == 0
    tier.drop_kv("acme", "nope")
    assert tier.stats() == {"bytes": 0, "sessions": 0}
    assert tier.client.exists(tier.session_key("acme", "nope")) == 0


def test_misfiled_manifest_is_detected(tier):
    tier.put_session(_m("x"), b"kv")
    tier.client.hset(tier.session_key("acme", "y"), "m", _m("x").encode())  # written behind the tier's back
    with pytest.raises(ContainerError, match="belongs to acme/x"):
        tier.get_manifest("acme", "y")


def test_garbage_manifest_is_a_container_error(tier):
    tier.put_session(_m("g"), None)
    tier.client.hset(tier.session_key("acme", "g"), "m", b"\x80\x04\x95 not a container at all, 40+ bytes long")
    with pytest.raises(ContainerError, match="bad magic"):
        tier.get_manifest("acme", "g")


def test_invalid_manifest_is_refused_before_writing(tier):
    bad = _m("bad")
    bad.kv_tokens = 3
    with pytest.raises(ContainerError, match="not a boundary"):
        tier.put_session(bad, b"kv")
    bad = _m("bad", tenant="no spaces")
    with pytest.raises(ValueError, match="must be 1..128"):
        tier.put_manifest(bad)
    assert tier.stats() == {"bytes": 0, "sessions": 0}


def test_survives_a_redis_restart_and_reports_down(tmp_path):
    """Lua scripts are flushed by a restart; the tier must reload them (and ping must say False when down)."""
    with RedisServer(data_dir=str(tmp_path), appendonly=True) as server:
        tier = RedisTier(redis.Redis.from_url(server.url, socket_timeout=2), namespace="restart")
        tier.put_session(_m("r1"), b"k" * 100)
        server.restart()
        assert tier.get_kv("acme", "r1") == b"k" * 100
        tier.put_session(_m("r2"), b"k" * 50)
        assert tier.delete_session("acme", "r1") is True
        assert tier.stats() == {"bytes": _stored_bytes(tier), "sessions": 1}
        server.kill()
        assert tier.ping() is False


def test_list_sessions_pages_through_one_tenant_only(redis_server):
    import redis as _redis

    from kvstore.tiers.manifest import SessionManifest
    from kvstore.tiers.redis_tier import RedisTier

    tier = RedisTier(_redis.Redis.from_url(redis_server.url), namespace="kvlist")
    for tenant, n in (("acme", 23), ("other", 5)):
        for i in range(n):
            tier.put_manifest(SessionManifest(tenant, f"s{i}", [1, 2, 3], [3], 0, "fp", "fp", 1.0, 2.0))
    seen, cursor, pages = [], 0, 0
    while True:
        cursor, page = tier.list_sessions("acme", cursor, limit=5)
        seen += [m.session_id for m, size in page if size > 0]
        pages += 1
        if cursor == 0:
            break
    assert sorted(set(seen)) == sorted(f"s{i}" for i in range(23)) and pages > 1
    assert all(m.tenant == "other" for m in (p for p, _ in tier.list_sessions("other", 0, 100)[1]))
    assert tier.list_sessions("nobody", 0, 10) == (0, [])


def test_every_script_touches_one_cluster_slot_and_stats_are_per_tenant(redis_server):
    import redis as _redis
    from redis.crc import key_slot

    from kvstore.tiers.manifest import SessionManifest
    from kvstore.tiers.redis_tier import RedisTier

    tier = RedisTier(_redis.Redis.from_url(redis_server.url), namespace="kvslot")
    assert key_slot(tier.session_key("acme", "s1").encode()) == key_slot(tier.stats_key("acme").encode())
    assert key_slot(tier.stats_key("acme").encode()) != key_slot(tier.stats_key("zeta-corp").encode())
    for tenant, n in (("acme", 3), ("zeta-corp", 2)):
        for i in range(n):
            tier.put_session(SessionManifest(tenant, f"s{i}", [1, 2], [2], 0, "fp", "fp", 1.0, 2.0), b"x" * 10)
    a, z = tier.tenant_stats("acme"), tier.tenant_stats("zeta-corp")
    assert a["sessions"] == 3 and z["sessions"] == 2 and a["bytes"] > z["bytes"] > 20
    assert tier.stats() == {"bytes": a["bytes"] + z["bytes"], "sessions": 5}
    tier.delete_session("acme", "s0")
    assert tier.tenant_stats("acme")["sessions"] == 2 and tier.stats()["sessions"] == 4
