"""Prometheus metrics: definitions for workers and gateway, and the bridge between them.

Each worker actor keeps its own `CollectorRegistry` (`WorkerMetrics`). `snapshot()` turns it into plain
data (names, types, labels, values: no objects), which crosses Ray; the gateway's
`WorkerMetricsCollector` re-exposes every worker's samples with a `worker` label on the gateway's single
`/metrics` endpoint. Names follow Prometheus conventions: `kvstash_` prefix, base units, `_total`, `_bytes`.
"""

from __future__ import annotations

import threading

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.metrics_core import Metric

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
KL_BUCKETS = (1e-6, 1e-5, 1e-4, 1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0)
ERROR_BUCKETS = (1e-4, 1e-3, 3e-3, 0.01, 0.03, 0.1, 0.3, 1.0)


ROW_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
GC_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)


class WorkerMetrics:
    """Metrics one worker exports (via the gateway)."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.kv_bytes = Gauge("kvstash_kv_bytes", "KV bytes held per tier.", ["tier"], registry=r)
        self.sessions = Gauge("kvstash_sessions", "Sessions on this worker's device, per state.", ["state"], registry=r)
        self.offloads = Counter("kvstash_offloads_total", "Sessions offloaded from the device to Redis.", registry=r)
        self.offload_bytes = Counter("kvstash_offload_bytes_total", "Bytes written to Redis by offloads.", registry=r)
        self.restores = Counter("kvstash_restores_total", "Sessions whose KV was restored from Redis.", registry=r)
        self.recomputes = Counter(
            "kvstash_recomputes_total", "Sessions whose KV was rebuilt from the token history.", ["reason"], registry=r
        )
        self.storage_errors = Counter("kvstash_storage_errors_total", "Failed Redis operations.", ["op"], registry=r)
        self.prefill_tokens = Counter("kvstash_prefill_tokens_total", "Tokens run through prefill.", registry=r)
        self.generated_tokens = Counter("kvstash_generated_tokens_total", "Tokens generated.", registry=r)
        self.restore_seconds = Histogram(
            "kvstash_restore_seconds", "Time to bring a cold session's KV back to the device.", ["source"],
            buckets=LATENCY_BUCKETS, registry=r,
        )
        self.compression_ratio = Gauge(
            "kvstash_compression_ratio", "Raw KV bytes over stored bytes of the last offload, per stage.", ["stage"], registry=r
        )
        self.queue_depth = Gauge("kvstash_worker_queue_depth", "Requests running or waiting on this worker.", registry=r)
        self.rejected = Counter(
            "kvstash_rejected_requests_total", "Calls refused because the worker was at its request limit.", registry=r)
        self.quality_samples = Counter(
            "kvstash_quality_probes_total", "Decode steps probed for quantization quality.", registry=r)
        self.quality_kl = Histogram(
            "kvstash_quality_attention_kl", "KL(fp || quantized) of attention distributions on probed steps, per layer.",
            ["layer"], buckets=KL_BUCKETS, registry=r)
        self.quality_error = Histogram(
            "kvstash_quality_attention_relative_error",
            "Relative L2 error of attention outputs on probed steps, per layer.", ["layer"], buckets=ERROR_BUCKETS,
            registry=r)
        self.history_recoveries = Counter(
            "kvstash_history_recoveries_total", "Session histories Redis did not have (or held corrupt) and the "
            "worker's journal gave back.", registry=r)
        self.rolled_back = Counter(
            "kvstash_rolled_back_calls_total", "Calls cut short (cancelled, past their deadline, failed) whose input "
            "and output were undone, by what became of the session's device KV (kept, or dropped: the model had run "
            "on it, so the next call restores or rebuilds it).", ["kv"], registry=r)
        self.storage_up = Gauge("kvstash_worker_storage_up", "1 when this worker's last Redis housekeeping "
                                "succeeded, else 0.", registry=r)
        self.load_decisions = Counter(
            "kvstash_load_decisions_total", "Stored KV blocks loaded or recomputed instead, by path (resume, prefix) "
            "and decision (load, recompute), as the measured-cost model chose.", ["path", "decision"], registry=r)
        self.forks = Counter("kvstash_forks_total", "Sessions started as a fork of another session (a copy of its "
                             "history and KV).", registry=r)
        self.prefix_lookups = Counter(
            "kvstash_prefix_lookups_total", "New sessions that looked for a stored prefix, by result (hit, miss).",
            ["result"], registry=r)
        self.prefix_hit_tokens = Counter(
            "kvstash_prefix_hit_tokens_total", "Prompt tokens whose KV was adopted from a stored prefix instead of "
            "prefilled, by the tier it came from (device: the worker's hot prefix trie; redis).", ["tier"], registry=r)
        self.batch_rows = Histogram(
            "kvstash_batch_rows", "Row count (bucket) of each decode pass.", buckets=ROW_BUCKETS, registry=r)
        self.batch_sessions = Histogram(
            "kvstash_batch_sessions", "Sessions decoded by each decode pass (its rows minus padding).",
            buckets=ROW_BUCKETS, registry=r)
        self.batch_max_rows = Gauge(
            "kvstash_batch_max_rows", "Largest decode bucket this worker uses (1: batching is off or refused).",
            registry=r)
        self.batch_invariance_failures = Counter(
            "kvstash_batch_invariance_failures_total", "Decode buckets refused at start because a pass of that "
            "row count was not batch-invariant on this build (a session's KV would depend on its batch-mates).",
            ["rows"], registry=r)
        self.prefill_packed = Histogram(
            "kvstash_prefill_packed_prompts", "Prompt chunks fed by each packed prefill pass (several sessions' "
            "last prompt chunks side by side in one pass).", buckets=ROW_BUCKETS[:5], registry=r)
        self.prefill_invariance_failures = Counter(
            "kvstash_prefill_invariance_failures_total", "Packed prefill sizes refused at start because a pass of "
            "that row count was not batch-invariant on this build.", ["rows"], registry=r)
        self.gc_pause_seconds = Histogram(
            "kvstash_worker_gc_pause_seconds", "Pauses of Python's cyclic garbage collector in the worker process "
            "(every thread stops), by generation (2: a full collection).", ["generation"], buckets=GC_BUCKETS,
            registry=r)
        for kv in ("kept", "dropped"):
            self.rolled_back.labels(kv)
        for reason in ("missing", "corrupt"):
            self.recomputes.labels(reason)
        for path in ("resume", "prefix"):
            for decision in ("load", "recompute"):
                self.load_decisions.labels(path, decision)
        for result in ("hit", "miss"):
            self.prefix_lookups.labels(result)
        for tier in ("device", "redis"):
            self.prefix_hit_tokens.labels(tier)
        self.sessions.labels("active")  # cold sessions live in Redis: see kvstash_stored_sessions

    def snapshot(self) -> list[dict]:
        """Plain-data copy of every sample (safe to send across processes)."""
        out = []
        for m in self.registry.collect():
            out.append({
                "name": m.name, "doc": m.documentation, "type": m.type,
                "samples": [(s.name, dict(s.labels), float(s.value)) for s in m.samples],
            })
        return out


class GatewayMetrics:
    """Metrics the gateway measures itself (client-visible latency, request outcomes)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        r = registry
        self.ttft = Histogram("kvstash_time_to_first_token_seconds", "Time from request to first token.", ["method"],
                              buckets=LATENCY_BUCKETS, registry=r)
        self.tpot = Histogram("kvstash_time_per_output_token_seconds", "Time between consecutive output tokens.",
                              ["method"], buckets=LATENCY_BUCKETS, registry=r)
        self.requests = Counter("kvstash_requests_total", "RPCs handled, by method and status code.", ["method", "code"],
                                registry=r)
        self.workers = Gauge("kvstash_workers", "Worker actors in routing.", registry=r)
        self.prefix_routed = Gauge(
            "kvstash_prefix_routed_sessions", "New sessions this gateway placed on a worker for its hot prompt "
            "prefix rather than by load alone (since the gateway started).", registry=r)
        self.tenant_tokens = Counter(
            "kvstash_tenant_tokens_total", "Tokens per tenant (bounded: tenants come from the API keys file), by kind.",
            ["tenant", "kind"], registry=r)
        self.http_conversations = Counter(
            "kvstash_http_conversations_total", "Stateless HTTP chat requests by how they found a remembered "
            "conversation: continued, not_continued (its history diverged, busy or gone), new (none matched).",
            ["result"], registry=r)


class WorkerMetricsCollector:
    """Prometheus collector re-exposing worker snapshots with a `worker` label."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._snapshots: dict[str, list[dict]] = {}

    def update(self, worker: str, snapshot: list[dict] | None) -> None:
        with self._lock:
            if snapshot is None:
                self._snapshots.pop(worker, None)
            else:
                self._snapshots[worker] = snapshot

    def collect(self):
        with self._lock:
            snaps = dict(self._snapshots)
        families: dict[str, Metric] = {}
        for worker, snap in sorted(snaps.items()):
            for fam in snap:
                m = families.get(fam["name"])
                if m is None:
                    m = families[fam["name"]] = Metric(fam["name"], fam["doc"], fam["type"])
                for name, labels, value in fam["samples"]:
                    # Worker "" carries cluster-wide samples (e.g. the Redis tier), exported without a worker label.
                    m.add_sample(name, {**labels, "worker": worker} if worker else dict(labels), value)
        yield from families.values()
