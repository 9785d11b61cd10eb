"""Load, bounded in time: 32 concurrent streaming sessions with resumes mixed in, over real gRPC against a real
stack (two Ray workers, redis-server, the tiny model). Only OK and the intended RESOURCE_EXHAUSTED come back,
and the processes' memory does not grow between two equal phases."""

import argparse
import asyncio
from pathlib import Path

import pytest

from services.bench.load import _phase
from tests.services.conftest import TINY_SPEC
from tests.services.stack import ServiceProcess, descendants

pytestmark = pytest.mark.e2e
SESSIONS, SECONDS = 32, 15.0


def _tree_rss(root: int) -> int:
    """Resident bytes of a process and all its descendants (the gateway, Ray, the worker actors)."""
    total = 0
    for pid in [root, *descendants(root)]:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
        except OSError:
            pass
    return total


@pytest.fixture(scope="module")
def stack(redis_server, tiny_model_dir, tmp_path_factory):
    svc = ServiceProcess(tmp_path_factory.mktemp("load"), {
        "KVSTASH_MODEL__NAME": str(tiny_model_dir), "KVSTASH_KV__SPEC": TINY_SPEC,
        "KVSTASH_REDIS__URL": redis_server.url, "KVSTASH_REDIS__NAMESPACE": "kvload",
        "KVSTASH_RAY__NUM_WORKERS": "2", "KVSTASH_SESSION__MAX_REQUESTS_PER_WORKER": "12",
        "KVSTASH_KV__QUALITY_SAMPLE_RATE": "0", "KVSTASH_SESSION__IDLE_TIMEOUT_S": "5",
        "KVSTASH_SESSION__IDLE_CHECK_INTERVAL_S": "1",
    })
    svc.start()
    yield svc
    svc.stop()


def test_32_concurrent_sessions_with_resumes_and_no_memory_growth(stack):
    args = argparse.Namespace(seconds=SECONDS, warmup=0.0, new_tokens=12, prompt_tokens=48, resume_every=3)
    asyncio.run(_phase(stack.target, None, SESSIONS, argparse.Namespace(**{**vars(args), "seconds": 5.0})))  # warm up
    phases, rss = [], []
    for _ in range(2):
        phases.append(asyncio.run(_phase(stack.target, None, SESSIONS, args)))
        rss.append(_tree_rss(stack.proc.pid))
    for p in phases:
        assert set(p["codes"]) <= {"OK", "RESOURCE_EXHAUSTED"}, p["codes"]
        assert p["codes"].get("OK", 0) >= SESSIONS and p["tokens_per_s"] > 0
    growth = rss[1] - rss[0]
    assert growth < 0.05 * rss[0] + (64 << 20), f"memory grew by {growth >> 20} MiB between equal phases ({rss})"
    print(f"load: {sum(p['calls'] for p in phases)} calls, {[round(p['tokens_per_s'], 1) for p in phases]} tokens/s, "
          f"rss {[r >> 20 for r in rss]} MiB")
