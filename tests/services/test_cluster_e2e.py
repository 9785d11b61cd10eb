"""kvstash on a real Redis Cluster, end to end: `kvstash up` (real Ray, real gRPC) with `redis.url` naming a
local cluster of 3 masters + 3 replicas of the Debian redis-server (issue 17).

Every case checks each session's final tokens against its uninterrupted greedy run: offload and resume,
a master killed and its replica promoted, slots migrated while sessions are offloaded and resumed. No
session may be lost, and a CROSSSLOT error anywhere (the service's log) fails the test.
"""

import subprocess
import threading
import time

import grpc
import pytest

from services.api.kvstash.v1 import kvstash_pb2 as pb
from services.client import KvstashClient
from services.runtime.process import ServiceProcess
from services.runtime.redis_cluster import LocalRedisCluster
from tests.services.conftest import TINY_SPEC

pytestmark = pytest.mark.e2e
N, K = 24, 8
PROMPTS = [f"Cluster case {i}: a story about ships, harbours and the tide." for i in range(6)]
EXACT_SOURCES = {pb.KV_SOURCE_RESTORED, pb.KV_SOURCE_RECOMPUTED}


@pytest.fixture(scope="module")
def cluster():
    """A cluster of its own (a master is killed here): failover after 1.5 s of silence, AOF on every node."""
    c = LocalRedisCluster(node_timeout_ms=1500, appendonly=True).start()
    yield c
    c.stop()


@pytest.fixture(scope="module")
def stack(cluster, tiny_model_dir, tmp_path_factory):
    home = tmp_path_factory.mktemp("home")
    env = {"KVSTASH_MODEL__NAME": str(tiny_model_dir), "KVSTASH_KV__SPEC": TINY_SPEC,
           "KVSTASH_REDIS__URL": cluster.url, "KVSTASH_REDIS__NAMESPACE": "kvcl", "KVSTASH_HOME": str(home),
           "KVSTASH_RAY__NUM_WORKERS": "2", "KVSTASH_SESSION__IDLE_CHECK_INTERVAL_S": "0.5",
           "KVSTASH_REDIS__SOCKET_TIMEOUT_S": "2", "KVSTASH_TIERS__HOST_BYTES": "0"}
    svc = ServiceProcess(tmp_path_factory.mktemp("cluster"), env).start()
    yield svc
    svc.stop()
    assert "CROSSSLOT" not in svc.log_path.read_text(errors="replace"), "a Redis command crossed slots"


@pytest.fixture(scope="module")
def refs(stack):
    with KvstashClient(stack.target, timeout=120) as c:
        return [list(c.generate(p, max_new_tokens=N).token_ids) for p in PROMPTS]


def _retry(call, timeout=120.0):
    """Calls during a failover may fail with UNAVAILABLE (retryable, as the service says); nothing else may."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return call()
        except grpc.RpcError as e:
            if e.code() != grpc.StatusCode.UNAVAILABLE or time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def _keys_per_master(cluster) -> list[int]:
    return [m.dbsize() for m in cluster.master_clients()]


def _text(v) -> str:
    return v.decode() if isinstance(v, bytes) else v


def _slots_of(node) -> int:
    """Slots a node serves, from its own CLUSTER NODES line ("a-b" ranges and single slots)."""
    line = next(x for x in _text(node.client().execute_command("CLUSTER", "NODES")).splitlines() if "myself" in x)
    count = 0
    for part in line.split()[8:]:
        if part.startswith("["):
            continue  # a slot being imported or migrated
        lo, _, hi = part.partition("-")
        count += int(hi or lo) - int(lo) + 1
    return count


def _offloaded(c, prompts) -> list:
    firsts = [c.generate(p, max_new_tokens=K) for p in prompts]
    for f in firsts:
        _retry(lambda f=f: c.evict_session(f.session_id))
    return firsts


def test_sessions_offload_and_resume_exactly_with_keys_on_every_master(stack, cluster, refs):
    with KvstashClient(stack.target, timeout=120) as c:
        firsts = _offloaded(c, PROMPTS)
        per_master = _keys_per_master(cluster)
        assert len(per_master) == 3 and min(per_master) > 0, f"one tenant's keys per master: {per_master}"
        for f, ref in zip(firsts, refs):
            rest = c.resume(f.session_id, max_new_tokens=N - K)
            assert rest.usage.kv_source == pb.KV_SOURCE_RESTORED
            assert list(f.token_ids) + list(rest.token_ids) == ref


def test_a_master_killed_its_replica_promoted_every_session_resumes_exactly(stack, cluster, refs):
    with KvstashClient(stack.target, timeout=120) as c:
        firsts = _offloaded(c, PROMPTS)
        masters = [n for n in cluster.nodes if n.running and n.client().info("replication")["role"] == "master"]
        victim = max(masters, key=lambda n: n.client().dbsize())
        assert victim.client().dbsize() > 0
        victim.kill()
        deadline = time.monotonic() + 60
        while len(cluster.master_clients()) < 3:  # a replica takes the dead master's slots
            assert time.monotonic() < deadline, "no replica was promoted"
            time.sleep(0.2)
        for f, ref in zip(firsts, refs):
            rest = _retry(lambda f=f: c.resume(f.session_id, max_new_tokens=N - K))
            assert rest.usage.kv_source in EXACT_SOURCES  # restored, or recomputed from the journal
            assert list(f.token_ids) + list(rest.token_ids) == ref


def test_slots_migrate_while_sessions_offload_and_resume(stack, cluster, refs):
    out: dict = {}

    with KvstashClient(stack.target, timeout=120) as c:
        firsts = _offloaded(c, PROMPTS[:3])
        # every slot of the master holding the most keys moves to another master: all its keys migrate
        masters = [n for n in cluster.nodes if n.running and n.client().info("replication")["role"] == "master"]
        src = max(masters, key=lambda n: n.client().dbsize())
        dst = next(n for n in masters if n is not src)
        src_id, dst_id = (_text(n.client().execute_command("CLUSTER", "MYID")) for n in (src, dst))
        slots = _slots_of(src)
        assert src.client().dbsize() > 0 and slots > 0

        def reshard():
            out["res"] = subprocess.run(["redis-cli", "--cluster", "reshard", f"127.0.0.1:{src.port}",
                                         "--cluster-from", src_id, "--cluster-to", dst_id, "--cluster-slots",
                                         str(slots), "--cluster-yes"], capture_output=True, text=True, timeout=600)

        got = [list(f.token_ids) for f in firsts]
        mover = threading.Thread(target=reshard)
        mover.start()
        while (mover.is_alive() or len(got[0]) == K) and len(got[0]) < N - 1:  # a token a time while slots move
            for f, tokens in zip(firsts, got):
                _retry(lambda f=f: c.evict_session(f.session_id))
                rest = _retry(lambda f=f: c.resume(f.session_id, max_new_tokens=1))
                assert rest.usage.kv_source in EXACT_SOURCES
                tokens += list(rest.token_ids)
        mover.join()
        assert out["res"].returncode == 0, out["res"].stdout[-2000:] + out["res"].stderr[-2000:]
        assert _slots_of(src) == 0 and src.client().dbsize() == 0  # everything it held moved
        assert len(got[0]) > K, "no session was offloaded and resumed while the slots moved"
        for f, tokens, ref in zip(firsts, got, refs):
            rest = c.resume(f.session_id, max_new_tokens=N - len(tokens))
            assert tokens + list(rest.token_ids) == ref
