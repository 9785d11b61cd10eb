"""Security over real gRPC, Ray and a password-protected redis-server: tenants cannot reach, hit, or salt
each other's data, and secrets never appear in logs or metric labels."""

import random
import time
import urllib.request

import grpc
import pytest
import redis

from kvstore.tiers.key_layout import KeyLayout
from kvstore.tiers.manifest import SessionManifest
from services.api.kvstash.v1 import kvstash_pb2 as pb
from services.client import KvstashClient
from services.runtime.redis_server import RedisServer
from tests.services.conftest import TINY_SPEC
from tests.services.stack import ServiceProcess

pytestmark = pytest.mark.e2e
KEY_A, KEY_B = "sk-alpha-3f9c1d7e5b2a4c6e8f0a1b2c", "sk-beta-7d1e9a3c5f2b4d6e8a0c1e3f"
WRONG = "sk-wrong-0a9b8c7d6e5f4a3b2c1d0e9f"
REDIS_PASSWORD, SALT_KEY = "redispw9d8c7b6a5f4e3d2c", "saltkey1a2b3c4d5e6f7a8b9c"
rng = random.Random(21)
PREFIX = [rng.randrange(1000, 20000) for _ in range(200)]


@pytest.fixture(scope="module")
def secured(tiny_model_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("security")
    server = RedisServer(data_dir=str(tmp / "redis"), password=REDIS_PASSWORD).start()
    keys = tmp / "keys.toml"
    keys.write_text(f'[keys]\n"{KEY_A}" = "alpha"\n"{KEY_B}" = "beta"\n')
    svc = ServiceProcess(tmp, {
        "KVSTASH_MODEL__NAME": str(tiny_model_dir), "KVSTASH_KV__SPEC": TINY_SPEC, "KVSTASH_REDIS__URL": server.url,
        "KVSTASH_REDIS__NAMESPACE": "kvsec", "KVSTASH_RAY__NUM_WORKERS": "1", "KVSTASH_GATEWAY__API_KEYS_FILE": str(keys),
        "KVSTASH_PREFIX__PREFILL_CHUNK": "64", "KVSTASH_PREFIX__SALT_KEY": SALT_KEY,
        "KVSTASH_GATEWAY__METRICS_POLL_INTERVAL_S": "0.5", "KVSTASH_TIERS__HOST_BYTES": "0",
    })
    svc.start()
    yield svc, redis.Redis.from_url(server.url)
    svc.stop()
    server.stop()


def test_tenants_never_reach_or_hit_each_other_s_data(secured):
    svc, rdb = secured
    with KvstashClient(svc.target, api_key=KEY_A, timeout=60) as a, KvstashClient(svc.target, api_key=KEY_B, timeout=60) as b:
        sa = a.generate(token_ids=PREFIX + [1], max_new_tokens=3)
        sa2 = a.generate(token_ids=PREFIX + [2], max_new_tokens=3)  # alpha's own prefix hit
        sb = b.generate(token_ids=PREFIX + [1], max_new_tokens=3)
        assert sb.usage.kv_source == pb.KV_SOURCE_NEW and sb.usage.cached_tokens == 0  # no hit on alpha's prefix
        for call in (lambda: b.get_session(sa.session_id), lambda: b.resume(sa.session_id, max_new_tokens=1),
                     lambda: b.delete_session(sa.session_id), lambda: b.evict_session(sa.session_id),
                     lambda: b.generate(fork_of=sa.session_id, max_new_tokens=1)):
            with pytest.raises(grpc.RpcError) as e:
                call()
            assert e.value.code() == grpc.StatusCode.NOT_FOUND  # the same as an id that never existed
        assert {s.session_id for s in b.list_sessions()} == {sb.session_id}
        for sid, parent, code in ((sa2.session_id, sa.session_id, grpc.StatusCode.ALREADY_EXISTS),  # not over one
                                  ("f1", "f1", grpc.StatusCode.INVALID_ARGUMENT),
                                  ("f1", "bad id!", grpc.StatusCode.INVALID_ARGUMENT)):
            with pytest.raises(grpc.RpcError) as e:
                a.generate(session_id=sid, fork_of=parent, max_new_tokens=1)
            assert e.value.code() == code
        assert {s.session_id for s in a.list_sessions()} == {sa.session_id, sa2.session_id}
        # a tenant cannot name another one, nor choose a salt: no request field says either, metadata is ignored
        for msg in (pb.GenerateRequest, pb.ResumeSessionRequest, pb.GetSessionRequest, pb.ListSessionsRequest):
            assert not {f.name for f in msg.DESCRIPTOR.fields} & {"tenant", "salt", "tenant_id"}
        md = [("authorization", f"Bearer {KEY_B}"), ("tenant", "alpha"), ("x-kvstash-tenant", "alpha"), ("salt", "x")]
        with pytest.raises(grpc.RpcError) as e:
            b.stub.GetSession(pb.GetSessionRequest(session_id=sa.session_id), metadata=md, timeout=30)
        assert e.value.code() == grpc.StatusCode.NOT_FOUND
        for sid, client in ((sa.session_id, a), (sb.session_id, b)):
            client.evict_session(sid)
        blocks = {}
        for tenant, sid in (("alpha", sa.session_id), ("beta", sb.session_id)):
            m = SessionManifest.decode(rdb.hget(KeyLayout("kvsec").session_key(tenant, sid), "m"))
            blocks[tenant] = {KeyLayout("kvsec").block_key(tenant, r) for r in m.blocks}
            assert not any(r.public for r in m.blocks)
        assert not blocks["alpha"] & blocks["beta"]  # the same tokens, never a shared block across tenants
        assert b.delete_session(sb.session_id)
        assert not any(rdb.exists(k) for k in blocks["beta"])  # a deleted session's private blocks go with it
        assert all(rdb.exists(k) for k in blocks["alpha"])


def test_secrets_never_appear_in_logs_or_metrics(secured):
    svc, _ = secured
    with KvstashClient(svc.target, api_key=WRONG, timeout=30) as bad, pytest.raises(grpc.RpcError) as e:
        bad.generate("let me in", max_new_tokens=2)
    assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED and WRONG not in e.value.details()
    with KvstashClient(svc.target, api_key=KEY_A, timeout=60) as a:
        sid = a.generate("hello", max_new_tokens=3).session_id
        a.evict_session(sid)
        a.resume(sid, max_new_tokens=2)
    time.sleep(1.5)  # a metrics poll
    metrics = urllib.request.urlopen(svc.metrics_url, timeout=10).read().decode()
    logs = svc.log_path.read_text(errors="replace")
    assert 'tenant="alpha"' in metrics  # labels name tenants, never keys
    for secret in (KEY_A, KEY_B, WRONG, REDIS_PASSWORD, SALT_KEY):
        assert secret not in metrics, "a secret in the metrics"
        assert secret not in logs, "a secret in the logs"
