"""`kvstash up` on its own Ray instance gives each worker an equal share of the CPUs, and torch as many threads.

A worker that reserved one CPU of two ran torch on one thread (Ray sets OMP_NUM_THREADS to the actor's
CPUs), leaving a core idle for prefill and batched passes on a machine whose other processes do not use it.
"""

import re

import pytest

from services.client import KvstashClient
from services.runtime.stack import local_cpus_per_worker
from tests.services.conftest import TINY_SPEC
from tests.services.stack import ServiceProcess

THREADS_RE = re.compile(r"loaded \S+ on cpu \((?:float32|bfloat16), linears: \S+, (\d+) torch threads\)")


@pytest.mark.parametrize(("cpus", "workers", "share"), [(2, 1, 2.0), (2, 2, 1.0), (2, 3, 1.0), (8, 3, 2.0),
                                                        (1, 1, 1.0), (16.0, 4, 4.0)])
def test_local_cpus_per_worker_is_an_equal_whole_share_of_at_least_one(cpus, workers, share):
    assert local_cpus_per_worker(cpus, workers) == share


@pytest.mark.e2e
@pytest.mark.parametrize(("workers", "threads"), [(1, 2), (2, 1)])
def test_a_local_stack_runs_each_worker_on_its_share_of_the_cpus(redis_server, tiny_model_dir, tmp_path, workers,
                                                                 threads):
    svc = ServiceProcess(tmp_path, {
        "KVSTASH_MODEL__NAME": str(tiny_model_dir), "KVSTASH_KV__SPEC": TINY_SPEC,
        "KVSTASH_REDIS__URL": redis_server.url, "KVSTASH_REDIS__NAMESPACE": f"kvcpu{workers}",
        "KVSTASH_RAY__NUM_WORKERS": str(workers), "KVSTASH_RAY__LOCAL_NUM_CPUS": "2",
    })
    svc.start()
    try:
        with KvstashClient(svc.target, timeout=60) as c:  # the workers are up and serve
            assert len(c.generate("share the cores", max_new_tokens=2).token_ids) == 2
        found = [int(n) for n in THREADS_RE.findall(svc.log_path.read_text(errors="replace"))]
        assert found and set(found) == {threads}, svc.log_tail()  # Ray folds the workers' identical lines into one
    finally:
        svc.stop()
