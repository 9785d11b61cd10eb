"""What several benchmarks share: the model cache, a worker's store and its prefill, percentiles, and the
measured window of a closed-loop phase (`WindowStats`).

Imports no benchmark module: benchmarks import it.
"""

from __future__ import annotations


def models_dir() -> str:
    """The model cache this environment uses, for benches that run a service under a home of their own."""
    from services.config import KvstashConfig
    from services.worker.model_store import store_for

    return str(store_for(KvstashConfig.load().model.cache_dir).cache_dir)


def worker_store(runner, redis_url: str, spec: str, namespace: str, **sections):
    """A worker's `CacheStore` (host tier off) on `runner` and a Redis URL, as the service builds it."""
    from kvstore.tiers.redis_tier import RedisTier
    from services.config import KvstashConfig
    from services.metrics import WorkerMetrics
    from services.runtime.redis_url import redis_client
    from services.worker.session_store import CacheStore

    cfg = KvstashConfig.from_dict({"kv": {"spec": spec}, "tiers": {"host_bytes": 0}, **sections})
    tier = RedisTier(redis_client(redis_url), namespace=namespace)
    return CacheStore(runner, tier, cfg, WorkerMetrics()), tier


def restore_stored(runner, store, tier, tenant: str, session_id: str):
    """The device cache of a stored session, read back from `tier` through `store` (a `CacheStore`) with no
    cost model deciding; AssertionError if it cannot be restored."""
    from services.worker.session import Session

    cold = Session.from_manifest(*tier.get_record(tenant, session_id))
    got = store.store.restore(tenant, cold.blocks, cold.stored_kv_tokens)
    assert got.state is not None, got.reason
    return runner.restore_cache(got.state)


def prefill(runner, store, ids):
    """A fresh cache and schedule after the worker's canonical prefill of `ids`."""
    from kvstore.schedule import passes

    cache, schedule, pos = runner.new_cache(store.quant), [], 0
    for n in passes(0, len(ids), store.prefill_chunk):
        runner.forward(cache, ids[pos:pos + n])
        schedule.append(n)
        pos += n
    return cache, schedule


def percentile(xs: list[float], q: float) -> float:
    """The `q`-quantile of `xs` (the sorted element at index floor(q * n), capped at the last); NaN when empty."""
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


class WindowStats:
    """Throughput counts the tokens streamed inside the measured window [start, stop) (calls still running at
    its edges count their tokens inside it); latencies are those of every call started inside the window,
    followed to its end."""

    def __init__(self, start: float, stop: float):
        import threading

        self.lock = threading.Lock()
        self.start, self.stop = start, stop
        self.tokens, self.ttft, self.gaps, self.calls, self.errors = 0, [], [], 0, 0

    def call(self, started: float, stamps: list[float], ok: bool) -> None:
        with self.lock:
            if not ok:
                self.errors += 1
            self.tokens += sum(self.start <= s < self.stop for s in stamps)
            if not self.start <= started < self.stop or not stamps:
                return
            self.calls += 1
            self.ttft.append(stamps[0] - started)
            self.gaps.extend(b - a for a, b in zip(stamps, stamps[1:]))

    def row(self) -> dict:
        """tokens/s over the window, TTFT and time-per-output-token (gap between tokens) p50/p99, calls."""
        return {"tokens_per_s": self.tokens / (self.stop - self.start), "ttft_p50_s": percentile(self.ttft, 0.5),
                "ttft_p99_s": percentile(self.ttft, 0.99), "tpot_p50_s": percentile(self.gaps, 0.5),
                "tpot_p99_s": percentile(self.gaps, 0.99), "calls": self.calls, "errors": self.errors}
