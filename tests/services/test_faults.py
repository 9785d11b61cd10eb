"""Faults, with real processes on 127.0.0.1 (kvstash up, Ray, redis-server): nothing is lost.

Every case checks the final tokens against an uninterrupted greedy run of the same history.
"""

import os
import signal
import threading
import time
import urllib.request

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from kvstore.tiers.key_layout import KeyLayout
from services.api.kvstash.v1 import kvstash_pb2 as pb
from services.client import KvstashClient
from services.runtime.redis_server import RedisServer, free_port
from tests.services.conftest import TINY_SPEC
from tests.services.stack import ServiceProcess

pytestmark = pytest.mark.e2e
PROMPTS = [f"Fault case {i}: tell me about rivers, mountains and the sea." for i in range(4)]
N, K = 40, 12


def _env(redis_url, home, **extra):
    return {"KVSTASH_MODEL__NAME": extra.pop("model"), "KVSTASH_KV__SPEC": TINY_SPEC,
            "KVSTASH_REDIS__URL": redis_url, "KVSTASH_REDIS__NAMESPACE": "kvfault", "KVSTASH_HOME": str(home),
            "KVSTASH_RAY__NUM_WORKERS": "2", "KVSTASH_GATEWAY__METRICS_POLL_INTERVAL_S": "0.5",
            "KVSTASH_SESSION__IDLE_CHECK_INTERVAL_S": "0.5", "KVSTASH_REDIS__SOCKET_TIMEOUT_S": "2",
            "KVSTASH_TIERS__HOST_BYTES": "0", **extra}


@pytest.fixture(scope="module")
def redis_aof(tmp_path_factory):
    server = RedisServer(data_dir=str(tmp_path_factory.mktemp("aof")), appendonly=True).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def stack(redis_aof, tiny_model_dir, tmp_path_factory):
    home = tmp_path_factory.mktemp("home")
    svc = ServiceProcess(tmp_path_factory.mktemp("faults"), _env(redis_aof.url, home, model=str(tiny_model_dir)))
    svc.start()
    svc.home = home
    yield svc
    svc.stop()


@pytest.fixture(scope="module")
def refs(stack):
    with KvstashClient(stack.target, timeout=120) as c:
        return [list(c.generate(p, max_new_tokens=N).token_ids) for p in PROMPTS]


def _metrics(url: str) -> dict:
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    out: dict = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[s.name] = out.get(s.name, 0.0) + s.value
    return out


def _wait(cond, what: str, timeout: float = 60.0):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, what
        time.sleep(0.25)


def _health(target: str, service: str) -> int:
    with grpc.insecure_channel(target) as ch:
        return health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=service), timeout=10).status


def _retry(call, codes=("UNAVAILABLE",), timeout=120.0):
    deadline = time.monotonic() + timeout
    while True:
        try:
            return call()
        except grpc.RpcError as e:
            if e.code().name not in codes or time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def test_redis_killed_during_offloads_then_restarted_loses_nothing(stack, redis_aof, refs):
    with KvstashClient(stack.target, timeout=120) as c:
        firsts = [c.generate(p, max_new_tokens=K) for p in PROMPTS]
        errors = []

        def evict(sid):
            try:
                c.evict_session(sid)
            except grpc.RpcError as e:
                errors.append(e.code())

        threads = [threading.Thread(target=evict, args=(f.session_id,)) for f in firsts]
        for t in threads:
            t.start()
        redis_aof.kill()  # while the offloads run
        for t in threads:
            t.join()
        assert set(errors) <= {grpc.StatusCode.UNAVAILABLE}
        redis_aof.restart()
        for f, ref in zip(firsts, refs):
            rest = _retry(lambda f=f: c.resume(f.session_id, max_new_tokens=N - K))
            assert list(f.token_ids) + list(rest.token_ids) == ref


def test_redis_restarted_from_its_aof_resumes_every_idle_session_exactly(stack, redis_aof, refs):
    with KvstashClient(stack.target, timeout=120) as c:
        firsts = [c.generate(p, max_new_tokens=K) for p in PROMPTS]
        for f in firsts:
            c.evict_session(f.session_id)
        redis_aof.restart()
        for f, ref in zip(firsts, refs):
            rest = _retry(lambda f=f: c.resume(f.session_id, max_new_tokens=N - K))
            assert rest.usage.kv_source == pb.KV_SOURCE_RESTORED
            assert list(f.token_ids) + list(rest.token_ids) == ref


def test_redis_data_lost_recomputes_from_the_journal_and_counts_it(stack, redis_aof, refs):
    with KvstashClient(stack.target, timeout=120) as c:
        firsts = [c.generate(p, max_new_tokens=K) for p in PROMPTS[:2]]
        for f in firsts:
            c.evict_session(f.session_id)
        before = _metrics(stack.metrics_url).get("kvstash_history_recoveries_total", 0)
        redis_aof.client().flushall()
        for f, ref in zip(firsts, refs):
            rest = _retry(lambda f=f: c.resume(f.session_id, max_new_tokens=N - K), codes=("UNAVAILABLE", "NOT_FOUND"))
            assert rest.usage.kv_source == pb.KV_SOURCE_RECOMPUTED
            assert list(f.token_ids) + list(rest.token_ids) == ref
        _wait(lambda: _metrics(stack.metrics_url).get("kvstash_history_recoveries_total", 0) >= before + 2,
              "history recoveries were not counted")


def test_a_worker_killed_mid_stream_gives_a_retryable_status_and_the_session_goes_on(stack, refs):
    with KvstashClient(stack.target, timeout=120) as c:
        first = c.generate(PROMPTS[0], max_new_tokens=K)
        worker = c.get_session(first.session_id).worker
        pid = int((stack.home / "run" / f"worker-{worker}.pid").read_text())
        stream = c.resume_stream(first.session_id, max_new_tokens=4000)
        with pytest.raises(grpc.RpcError) as e:
            for i, _ in enumerate(stream):
                if i == 3:  # mid-stream: the worker serving it dies
                    os.kill(pid, signal.SIGKILL)
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE and "retry" in e.value.details()
        rest = _retry(lambda: c.resume(first.session_id, max_new_tokens=N - K))  # the cut call left no trace
        assert list(first.token_ids) + list(rest.token_ids) == refs[0]


def test_a_gateway_restart_keeps_every_session(redis_aof, tiny_model_dir, tmp_path, refs):
    home = tmp_path / "home"
    env = _env(redis_aof.url, home, model=str(tiny_model_dir), KVSTASH_REDIS__NAMESPACE="kvrestart")
    svc = ServiceProcess(tmp_path / "a", env).start()
    try:
        with KvstashClient(svc.target, timeout=120) as c:
            firsts = [c.generate(p, max_new_tokens=K) for p in PROMPTS[:2]]
            c.evict_session(firsts[1].session_id)  # one cold, one hot at the restart
    finally:
        svc.stop(drain=True)
    again = ServiceProcess(tmp_path / "b", env).start()
    try:
        with KvstashClient(again.target, timeout=120) as c:
            for f, ref in zip(firsts, refs):
                rest = c.resume(f.session_id, max_new_tokens=N - K)
                assert rest.usage.kv_source == pb.KV_SOURCE_RESTORED  # the hot one was offloaded on the way out
                assert list(f.token_ids) + list(rest.token_ids) == ref
    finally:
        again.stop()


def test_redis_unreachable_at_start_then_back(tiny_model_dir, tmp_path):
    port = free_port()
    env = _env(f"redis://127.0.0.1:{port}/0", tmp_path / "home", model=str(tiny_model_dir),
               KVSTASH_RAY__NUM_WORKERS="1", KVSTASH_REDIS__NAMESPACE="kvlate")
    svc = ServiceProcess(tmp_path / "late", env).start()
    try:
        with KvstashClient(svc.target, timeout=120) as c:
            out = c.generate("served while Redis is away", max_new_tokens=6)  # from the device tier
            assert len(out.token_ids) == 6
            _wait(lambda: _health(svc.target, "kvstash.v1.Storage") == health_pb2.HealthCheckResponse.NOT_SERVING,
                  "storage health never said NOT_SERVING")
            assert _health(svc.target, "kvstash.v1.KvStash") == health_pb2.HealthCheckResponse.SERVING
            assert _metrics(svc.metrics_url).get("kvstash_storage_up") == 0
            with RedisServer(port=port, data_dir=str(tmp_path / "redis")) as server:
                _wait(lambda: _health(svc.target, "kvstash.v1.Storage") == health_pb2.HealthCheckResponse.SERVING,
                      "storage health never recovered")
                _wait(lambda: _metrics(svc.metrics_url).get("kvstash_storage_up") == 1, "storage_up stayed 0")
                _wait(lambda: server.client().exists(KeyLayout("kvlate").session_key("default", out.session_id)) == 1,
                      "the history written while Redis was away never reached it")
                more = c.resume(out.session_id, max_new_tokens=3)
                assert more.usage.kv_source == pb.KV_SOURCE_DEVICE
    finally:
        svc.stop()
