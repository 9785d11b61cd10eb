"""Per-tenant quotas: sessions and stored bytes (worker, from Redis stats), tokens per minute (gateway);
with API keys: tenant isolation, UNAUTHENTICATED and FAILED_PRECONDITION over real gRPC."""

import grpc
import pytest

from services.client import KvstashClient
from services.errors import ResourceExhausted
from services.gateway.quota import TokenRate
from tests.services.conftest import TINY_SPEC
from tests.services.stack import ServiceProcess


class Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


def test_token_rate_window_and_retry_hint():
    clock = Clock()
    rate = TokenRate(100, clock)
    rate.check("a")
    rate.add("a", 60)
    clock.t += 10
    rate.add("a", 50)  # 110 in the window
    with pytest.raises(ResourceExhausted, match="max_tokens_per_minute=100") as e:
        rate.check("a")
    assert e.value.retry_after_s == pytest.approx(50.0)  # the first call leaves the window 60 s after it ended
    rate.check("b")  # tenants are separate
    clock.t += 50.001
    rate.check("a")  # 50 left in the window
    assert TokenRate(0, clock).check("a") is None  # 0: no limit


@pytest.mark.e2e
def test_quotas_are_enforced_per_tenant(redis_server, tiny_model_dir, tmp_path):
    keys = tmp_path / "keys.toml"
    keys.write_text('[keys]\n"key-a" = "alpha"\n"key-b" = "beta"\n')
    svc = ServiceProcess(tmp_path, {
        "KVSTASH_MODEL__NAME": str(tiny_model_dir), "KVSTASH_KV__SPEC": TINY_SPEC,
        "KVSTASH_REDIS__URL": redis_server.url, "KVSTASH_REDIS__NAMESPACE": "kvquota",
        "KVSTASH_RAY__NUM_WORKERS": "1", "KVSTASH_GATEWAY__API_KEYS_FILE": str(keys),
        "KVSTASH_QUOTA__MAX_SESSIONS": "2", "KVSTASH_QUOTA__MAX_TOKENS_PER_MINUTE": "60",
    })
    svc.start()
    try:
        with KvstashClient(svc.target, api_key="key-a", timeout=60) as a, \
                KvstashClient(svc.target, api_key="key-b", timeout=60) as b:
            s1 = a.generate("one", max_new_tokens=2).session_id
            a.generate("two", max_new_tokens=2)
            with pytest.raises(grpc.RpcError) as e:
                a.generate("three", max_new_tokens=2)
            assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "quota.max_sessions=2" in e.value.details()
            assert len(a.resume(s1, max_new_tokens=2).token_ids) == 2  # existing sessions go on
            bs = b.generate("another tenant", max_new_tokens=2).session_id  # the quota is per tenant
            assert a.delete_session(s1)
            last = a.generate("three, after a delete", max_new_tokens=2).session_id
            with pytest.raises(grpc.RpcError) as e:  # tokens per minute (prompt + generated), at the gateway
                for _ in range(10):
                    a.resume(last, max_new_tokens=20)
            assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "quota.max_tokens_per_minute=60" in e.value.details()
            assert 0 < int(dict(e.value.trailing_metadata())["retry-after-ms"]) <= 60000
            b.resume(bs, max_new_tokens=2)  # beta is not limited by alpha's use
            # isolation: another tenant's session is indistinguishable from one that never existed
            with pytest.raises(grpc.RpcError) as e:
                b.get_session(last)
            assert e.value.code() == grpc.StatusCode.NOT_FOUND
            for key in (None, "wrong-key"):
                with KvstashClient(svc.target, api_key=key, timeout=30) as anon, pytest.raises(grpc.RpcError) as e:
                    anon.generate("who am i", max_new_tokens=1)
                assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
            # a session serves one call at a time: a second concurrent call is FAILED_PRECONDITION
            busy = bs
            stream = b.resume_stream(busy, max_new_tokens=200)
            next(stream)  # the first call holds the session now
            with pytest.raises(grpc.RpcError) as e:
                b.resume(busy, max_new_tokens=1)
            assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "busy" in e.value.details()
            stream.cancel()
    finally:
        svc.stop()
