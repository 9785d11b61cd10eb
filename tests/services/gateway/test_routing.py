"""Routing and operator calls over real gRPC, real Ray (two worker actors) and a real redis-server:
prefix locality, MarkPublicPrefix (operators only, shared across tenants), deadlines and cancellation."""

import random
import time
import urllib.request

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from services.api.kvstash.v1 import kvstash_pb2 as pb
from services.client import KvstashClient
from tests.services.conftest import TINY_SPEC
from tests.services.stack import ServiceProcess

pytestmark = pytest.mark.e2e
rng = random.Random(11)
PREFIX = [rng.randrange(1000, 20000) for _ in range(200)]  # 3 prefill chunks of 64 are shareable


@pytest.fixture(scope="module")
def stack(redis_server, tiny_model_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("routing")
    keys = tmp / "keys.toml"
    keys.write_text('[keys]\n"key-a" = "alpha"\n"key-b" = "beta"\n"key-ops" = "ops"\n')
    svc = ServiceProcess(tmp, {
        "KVSTASH_MODEL__NAME": str(tiny_model_dir), "KVSTASH_KV__SPEC": TINY_SPEC,
        "KVSTASH_REDIS__URL": redis_server.url, "KVSTASH_REDIS__NAMESPACE": "kvroute",
        "KVSTASH_RAY__NUM_WORKERS": "2", "KVSTASH_PREFIX__PREFILL_CHUNK": "64",
        "KVSTASH_GATEWAY__API_KEYS_FILE": str(keys), "KVSTASH_GATEWAY__ADMIN_TENANTS": "ops",
        "KVSTASH_GATEWAY__METRICS_POLL_INTERVAL_S": "0.5", "KVSTASH_KV__QUALITY_SAMPLE_RATE": "0",
    })
    svc.start()
    yield svc
    svc.stop()


def _client(stack, key, timeout=60):
    return KvstashClient(stack.target, api_key=key, timeout=timeout)


def test_new_sessions_go_where_their_prefix_is_hot(stack):
    with _client(stack, "key-a") as a:
        first = a.generate(token_ids=PREFIX + [1], max_new_tokens=2)
        home = a.get_session(first.session_id).worker
        for i in range(4):  # least-loaded placement alone would alternate between the two workers
            out = a.generate(token_ids=PREFIX + [2 + i, 3], max_new_tokens=2)
            assert out.usage.kv_source == pb.KV_SOURCE_PREFIX and out.usage.cached_tier == pb.TIER_DEVICE
            assert out.usage.cached_tokens == 192
            assert a.get_session(out.session_id).worker == home
        time.sleep(1.5)  # three load polls: none still shows the sessions just served on `home`
        placed = {a.get_session(a.generate(token_ids=[rng.randrange(1000, 20000) for _ in range(30)],
                                           max_new_tokens=1).session_id).worker for _ in range(4)}
        assert placed == {"w0", "w1"}  # without a hot prefix, load decides
    with _client(stack, "key-b") as b:  # another tenant's private prefix is no reason to go there, nor a hit
        out = b.generate(token_ids=PREFIX + [9], max_new_tokens=2)
        assert out.usage.kv_source == pb.KV_SOURCE_NEW


def test_public_prefixes_are_for_operators_and_shared_by_every_tenant(stack):
    system = [rng.randrange(1000, 20000) for _ in range(140)]
    with _client(stack, "key-a") as a, pytest.raises(grpc.RpcError) as e:
        a.mark_public_prefix(token_ids=system)
    assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED and "operators" in e.value.details()
    with _client(stack, "key-ops") as ops:
        with pytest.raises(grpc.RpcError) as e:
            ops.mark_public_prefix(token_ids=system[:40])
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "prefill_chunk=64" in e.value.details()
        res = ops.mark_public_prefix(token_ids=system)
        assert (res.prompt_tokens, res.shared_tokens, res.newly_registered) == (140, 128, True)
        assert not ops.mark_public_prefix(token_ids=system).newly_registered
    outs = []
    for key in ("key-a", "key-b"):
        with _client(stack, key) as c:
            for tail in ([5], [6, 7]):
                out = c.generate(token_ids=system + tail, max_new_tokens=4)
                assert out.usage.kv_source == pb.KV_SOURCE_PREFIX and out.usage.cached_tokens == 128
                assert out.usage.cached_tier in (pb.TIER_DEVICE, pb.TIER_REDIS)
                outs.append(list(out.token_ids))
    assert outs[0] == outs[2] and outs[1] == outs[3]  # the same public KV for both tenants


def _metric(url: str, name: str) -> float:
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    return sum(s.value for fam in text_string_to_metric_families(text) for s in fam.samples if s.name == name)


def _once_free(call, timeout: float = 30.0):
    """`call`'s result once the session it resumes is no longer busy (FAILED_PRECONDITION until then)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return call()
        except grpc.RpcError as err:
            assert err.code() == grpc.StatusCode.FAILED_PRECONDITION and time.monotonic() < deadline
            time.sleep(0.2)


def test_deadlines_reach_the_worker_and_free_the_session(stack):
    with _client(stack, "key-a", timeout=120) as a:
        first = a.generate("a session with a deadline", max_new_tokens=2)
        sid = first.session_id
        with _client(stack, "key-a", timeout=1.5) as hurried, pytest.raises(grpc.RpcError) as e:
            hurried.resume(sid, max_new_tokens=4000)
        assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        more = _once_free(lambda: a.resume(sid, max_new_tokens=2))  # the worker stopped: the session is not busy
        assert len(more.token_ids) == 2
        # the call cut by its deadline left no trace: the history is the first call's plus these two tokens
        assert more.usage.session_tokens == first.usage.session_tokens + 2 == a.get_session(sid).token_count


def test_a_cancelled_stream_stops_generating_and_frees_its_slot(stack):
    with _client(stack, "key-a", timeout=120) as a:
        first = a.generate("cancel me after two tokens", max_new_tokens=2)
        sid = first.session_id
        stream = a.resume_stream(sid, max_new_tokens=4000)
        for i, _ in enumerate(stream):
            if i == 1:
                stream.cancel()
                break
        more = _once_free(lambda: a.resume(sid, max_new_tokens=1))  # the worker stopped: the session is free
        assert more.usage.session_tokens == first.usage.session_tokens + 1  # the cancelled call left no trace
        # a new session whose first call is cancelled never existed
        stream = a.generate_stream("cancel me before I am done", max_new_tokens=4000)
        new = next(stream).session_id
        stream.cancel()
        deadline = time.monotonic() + 30
        while True:
            try:
                a.get_session(new)
            except grpc.RpcError as err:  # GetSession answers while the call still runs, then NOT_FOUND
                assert err.code() == grpc.StatusCode.NOT_FOUND, err
                break
            assert time.monotonic() < deadline, "the cancelled first call left a session behind"
            time.sleep(0.2)
        deadline = time.monotonic() + 30
        while _metric(stack.metrics_url, "kvstash_worker_queue_depth") > 0:
            assert time.monotonic() < deadline, "a worker still counts the cancelled request"
            time.sleep(0.3)
