"""A worker actor killed (SIGKILL) is dropped from routing, the API's health (kvstash.v1.KvStash) turns
NOT_SERVING while no worker can serve (the server's own, "", stays SERVING for liveness), the gateway creates the actor again, and sessions continue exactly from their durable history."""

import os
import signal
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.client import KvstashClient
from tests.services.conftest import TINY_SPEC
from tests.services.stack import ServiceProcess, descendants

pytestmark = pytest.mark.e2e


def _worker_pids(root: int) -> list[int]:
    pids = []
    for p in descendants(root):
        try:
            cmd = Path(f"/proc/{p}/cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if "WorkerActor" in cmd:
            pids.append(p)
    return pids


def _health(target: str, service: str = "kvstash.v1.KvStash") -> int:
    with grpc.insecure_channel(target) as ch:
        return health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=service), timeout=10).status


@pytest.fixture(scope="module")
def one_worker(redis_server, tiny_model_dir, tmp_path_factory):
    svc = ServiceProcess(tmp_path_factory.mktemp("failover"), {
        "KVSTASH_MODEL__NAME": str(tiny_model_dir), "KVSTASH_KV__SPEC": TINY_SPEC,
        "KVSTASH_REDIS__URL": redis_server.url, "KVSTASH_REDIS__NAMESPACE": "kvfail",
        "KVSTASH_RAY__NUM_WORKERS": "1", "KVSTASH_GATEWAY__METRICS_POLL_INTERVAL_S": "0.5",
    })
    svc.start()
    yield svc
    svc.stop()


def test_killed_worker_comes_back_and_sessions_continue(one_worker):
    with KvstashClient(one_worker.target, timeout=120) as client:
        ref = client.generate("The river runs to the sea and", max_new_tokens=12)
        sid = client.generate("The river runs to the sea and", max_new_tokens=5).session_id
        pids = _worker_pids(one_worker.proc.pid)
        assert len(pids) == 1, pids
        os.kill(pids[0], signal.SIGKILL)
        deadline, saw_not_serving = time.monotonic() + 180, False
        while True:  # health goes NOT_SERVING until the actor is back, then SERVING again
            status = _health(one_worker.target)
            saw_not_serving |= status == health_pb2.HealthCheckResponse.NOT_SERVING
            assert _health(one_worker.target, "") == health_pb2.HealthCheckResponse.SERVING  # liveness holds
            if saw_not_serving and status == health_pb2.HealthCheckResponse.SERVING:
                break
            assert time.monotonic() < deadline, one_worker.log_tail()
            time.sleep(0.2)
        new = _worker_pids(one_worker.proc.pid)
        assert len(new) == 1 and new != pids
        rest = client.resume(sid, max_new_tokens=7)  # rebuilt from its durable history on the new actor
        assert list(rest.token_ids) == list(ref.token_ids)[5:]
