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
