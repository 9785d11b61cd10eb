"""The worker's side of stored KV: it builds the library's `SessionStore` (kvstore/tiers/store.py) from the
config, turns its events into Prometheus metrics, and moves KV between device caches and stored states.

`CacheStore` is all the `SessionManager` uses of storage: every storage decision (naming, salting, dedup,
cold mode, coding, tiers, checks) stays inside the library; this adapter only owns the model-side steps —
restoring a `QuantizedKVCache` from a `KVState` on the runner's device, sealing a copy for the prefix trie,
and running a public prefix's prefill passes.

Invariants:
- `restore` and `adopt` give caches bit-identical to the states the library returns (`ModelRunner.restore_cache`).
- `save` writes the session's committed history (`Session.manifest`) with its stored KV, and updates the
  session's stored-KV fields only once Redis has it.
"""

from __future__ import annotations

from collections.abc import Generator
from dataclasses import dataclass

from kvstore.device import QuantizedKVCache
from kvstore.schedule import passes
from kvstore.storage import (
    MISSING,
    BytesWritten,
    CompressionMeasured,
    ModelIdentity,
    Published,
    RedisTier,
    RestoreDecided,
    SessionStore,
    StorageFailed,
    StoreEvent,
    StoreSettings,
)
from services.config import KvstashConfig
from services.metrics import WorkerMetrics
from services.worker.model_runner import ModelRunner
from services.worker.session import Session


@dataclass(frozen=True)
class RestoredCache:
    """A session's stored KV brought back to the device, and the tier it came from; or None and why
    ("missing", "corrupt", or "cost" when the cost model chose to recompute)."""

    cache: QuantizedKVCache | None
    tier: str = ""
    reason: str = ""


@dataclass(frozen=True)
class AdoptedPrefix:
    """A stored prefix a new session takes over: its cache (all sealed) and the tokens it covers."""

    cache: QuantizedKVCache
    tokens: int
    from_trie: int  # blocks found hot in the trie
    from_redis: int  # blocks fetched from Redis


class MetricsEvents:
    """The library store's events as the worker's Prometheus metrics."""

    def __init__(self, metrics: WorkerMetrics):
        self.metrics = metrics

    def __call__(self, e: StoreEvent) -> None:
        m = self.metrics
        if isinstance(e, BytesWritten):
            m.offload_bytes.inc(e.nbytes)
        elif isinstance(e, CompressionMeasured):
            m.compression_ratio.labels("quantization").set(e.quantization)  # fp16 KV -> device format
            m.compression_ratio.labels("codec").set(e.codec)  # device format -> stored blocks
            m.compression_ratio.labels("total").set(e.total)
        elif isinstance(e, StorageFailed):
            m.storage_errors.labels(e.op).inc()
        elif isinstance(e, RestoreDecided):
            m.load_decisions.labels(e.path, e.decision).inc(e.blocks)


def store_settings(cfg: KvstashConfig) -> StoreSettings:
    return StoreSettings(block_tokens=cfg.block_tokens, prefill_chunk=cfg.prefix.prefill_chunk,
                         sharing=cfg.prefix.enabled, salt_key=cfg.prefix.salt_key.encode(), cold=cfg.cold,
                         codec_level=cfg.kv.codec_level, host_bytes=cfg.tiers.host_bytes,
                         trie_bytes=cfg.prefix.trie_bytes, codec_threads=cfg.tiers.codec_threads)


class CacheStore:
    def __init__(self, runner: ModelRunner, tier: RedisTier, cfg: KvstashConfig, metrics: WorkerMetrics):
        self.runner, self.metrics, self.quant = runner, metrics, cfg.quant
        model = ModelIdentity(runner.fingerprint, runner.shape, self.quant, runner.device.type,
                              runner.key_exps() if cfg.cold is not None and cfg.cold.query_keys else None)
        self.store = SessionStore(tier, model, store_settings(cfg), MetricsEvents(metrics))
        self.store.coder.warm_up(new_cache=lambda: runner.new_cache(self.quant))
        self.prefill_chunk, self.block_tokens = self.store.chunk, self.store.block_tokens

    def save(self, s: Session) -> int:
        """Store `s.cache` and commit the session's manifest; returns its Redis bytes. Raises on failure."""
        saved = self.store.save(s.manifest(self.runner.fingerprint, self.quant.spec()), s.cache.export_state(),
                                s.held_blocks, s.manifest_sha)
        s.blocks, s.stored_kv_tokens, s.manifest_sha = saved.blocks, saved.kv_tokens, saved.manifest_sha
        s.referenced = True
        return saved.redis_bytes

    def restore(self, s: Session) -> RestoredCache:
        """The cache stored for `s`, bit-identical, if the cost model says restoring beats recomputing."""
        if not (s.blocks and s.stored_kv_tokens):
            return RestoredCache(None, reason=MISSING)
        decide = "load" if self.store.cost.restore_pays(len(s.blocks), s.stored_kv_tokens) else "recompute"
        self.metrics.load_decisions.labels("resume", decide).inc(len(s.blocks))
        if decide == "recompute":
            return RestoredCache(None, reason="cost")
        got = self.store.restore(s.tenant, s.blocks, s.stored_kv_tokens)
        if got.state is None:
            return RestoredCache(None, reason=got.reason)
        return RestoredCache(self.runner.restore_cache(got.state), tier=got.tier)

    def adopt(self, tenant: str, tokens: list[int]) -> AdoptedPrefix | None:
        a = self.store.adopt(tenant, tokens)
        if a is None:
            return None
        return AdoptedPrefix(self.runner.restore_cache(a.state), a.tokens, a.from_trie, a.from_redis)

    def register_prefix(self, s: Session) -> int:
        """Put the canonical blocks of `s` (after its first prefill) into the trie."""
        if s.cache is None:
            return 0

        def sealed():
            copy = self.runner.restore_cache(s.cache.export_state())
            copy.seal_all()  # the window's canonical blocks, sealed exactly as the session will seal them
            return copy.export_state()
        return self.store.register_prefix(s.tenant, s.tokens, s.schedule, sealed)

    def mark_public(self, tokens: list[int]) -> Generator[None, None, Published]:
        """Prefill the shareable prefix of `tokens` in canonical passes (yielding between them) and publish it.
        Raises ValueError when sharing is off or there is no whole chunk."""
        n_tok = self.store.public_tokens(len(tokens))
        cache, pos = self.runner.new_cache(self.quant), 0
        for n in passes(0, n_tok, self.prefill_chunk):
            self.runner.forward(cache, tokens[pos:pos + n])
            pos += n
            yield
        cache.seal_all()
        return self.store.publish(tokens[:n_tok], cache.export_state())

    def observe_prefill(self, tokens: int, seconds: float) -> None:
        self.store.cost.observe_prefill(tokens, seconds)

    def hot_tokens(self, tenant: str, tokens: list[int]) -> int:
        return self.store.hot_tokens(tenant, tokens)

    def has_hot_prefixes(self) -> bool:
        return len(self.store.trie) > 0

    def refresh_public(self) -> int:
        return self.store.refresh_public()

    def delete(self, tenant: str, session_id: str) -> bool:
        return self.store.delete(tenant, session_id)

    @property
    def host_bytes(self) -> int:
        return self.store.host.nbytes

    @property
    def trie_bytes(self) -> int:
        return self.store.trie.nbytes
