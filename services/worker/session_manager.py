"""`SessionManager`: a worker's sessions, their tiers, and the offload/restore/recompute paths.

Only ACTIVE sessions (KV on the device) live in memory; a cold session is its Redis manifest (the
durable token history) plus, usually, its encoded KV. All methods run on the engine thread.

Invariants:
- Restoring gives a cache bit-identical to the one offloaded (the codec is lossless and the manifest's
  fingerprint and quant spec must match), so greedy continuation is unchanged.
- When the stored KV is missing, corrupt or covers fewer tokens than the history, the KV is rebuilt by
  replaying the recorded forward schedule over the token history: the same forward passes in the same
  order, hence the same KV bit for bit. Each such rebuild is counted in `kvstash_recomputes_total`.
- A failed Redis write never loses device state: the session stays ACTIVE and the error is counted.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Generator

from kvstore.codec.container import ContainerError
from kvstore.codec.kv import decode_kv, encode_kv
from kvstore.config import QuantConfig
from kvstore.quant.cache import QuantizedKVCache
from kvstore.tiers.redis_tier import RedisTier
from services.errors import FailedPrecondition, Internal, NotFound, Unavailable
from services.metrics import WorkerMetrics
from services.worker.model_runner import ModelRunner
from services.worker.session import Session

log = logging.getLogger(__name__)

# Where a session's KV came from at the start of a call (mirrors kvstash.v1.KvSource).
NEW, DEVICE, RESTORED, RECOMPUTED = "new", "device", "restored", "recomputed"


class SessionManager:
    def __init__(self, runner: ModelRunner, tier: RedisTier, quant: QuantConfig, metrics: WorkerMetrics,
                 codec_level: int = 3):
        self.runner, self.tier, self.quant, self.metrics = runner, tier, quant, metrics
        self.codec_level = codec_level
        self.active: dict[tuple[str, str], Session] = {}

    # ---- lookup --------------------------------------------------------------------------------
    def find(self, tenant: str, session_id: str) -> Session | None:
        """The session, from memory or from its Redis manifest (then COLD, not yet registered)."""
        s = self.active.get((tenant, session_id))
        if s is not None:
            return s
        try:
            m = self.tier.get_manifest(tenant, session_id)
        except ContainerError as e:
            log.error("manifest of %s/%s is corrupt: %s", tenant, session_id, e)
            raise Internal(f"session {session_id} has a corrupt history record") from None
        except Exception as e:  # noqa: BLE001 - Redis down: the session may exist, we cannot tell
            self.metrics.storage_errors.labels("get_manifest").inc()
            raise Unavailable(f"session storage is unavailable: {type(e).__name__}") from None
        return Session.from_manifest(m) if m is not None else None

    def get(self, tenant: str, session_id: str) -> Session:
        """Like `find`, but an unknown session is NotFound."""
        s = self.find(tenant, session_id)
        if s is None:
            raise NotFound(f"session {session_id!r} not found")
        return s

    @staticmethod
    def check_not_busy(s: Session) -> Session:
        if s.busy:
            raise FailedPrecondition(f"session {s.session_id!r} is busy with another request")
        return s

    def acquire(self, tenant: str, session_id: str, create: bool) -> Session:
        s = self.find(tenant, session_id) if create else self.get(tenant, session_id)
        s = self.check_not_busy(s or Session(tenant=tenant, session_id=session_id))
        s.busy = True
        return s

    def device_bytes(self) -> int:
        """Device bytes held by every active session (measured from tensor storages)."""
        return sum(s.device_bytes() for s in list(self.active.values()))

    def invalidate(self, s: Session) -> None:
        """Forget the device copy of a session whose state can no longer be trusted."""
        s.cache = None
        self.active.pop(s.key, None)

    def release(self, s: Session) -> None:
        s.busy = False
        s.last_used = time.time()
        if s.cache is not None:
            self.active[s.key] = s
        self._update_gauges()

    # ---- bringing KV to the device ----------------------------------------------------------------
    def ensure_kv(self, s: Session) -> Generator[None, None, str]:
        """Make `s.cache` cover `s.schedule`; yields between replayed forward passes. Returns the source."""
        if s.cache is not None:
            return DEVICE
        if not s.schedule:
            s.cache = self.runner.new_cache(self.quant)
            return NEW
        t0 = time.perf_counter()
        cache, covered, reason = self._load_stored_kv(s)
        if cache is None:
            cache, covered = self.runner.new_cache(self.quant), 0
        replayed = 0
        done = 0
        for n in s.schedule:  # replay the forward passes the stored KV does not cover
            if done >= covered:
                self.runner.forward(cache, s.tokens[done:done + n])
                replayed += n
                yield
            done += n
        s.cache = cache
        source = RESTORED if replayed == 0 else RECOMPUTED
        if replayed:
            self.metrics.recomputes.labels(reason or "stale").inc()
            self.metrics.prefill_tokens.inc(replayed)
            log.warning("session %s/%s: rebuilt %d tokens of KV by replay (%s)", s.tenant, s.session_id, replayed,
                        reason or "stale")
        else:
            self.metrics.restores.inc()
        self.metrics.restore_seconds.labels(source).observe(time.perf_counter() - t0)
        return source

    def _load_stored_kv(self, s: Session) -> tuple[QuantizedKVCache | None, int, str | None]:
        """(cache, tokens it covers, why not) from Redis; never raises for bad data."""
        if s.stored_kv_tokens == 0:
            return None, 0, "missing"
        try:
            blob = self.tier.get_kv(s.tenant, s.session_id)
        except Exception as e:  # noqa: BLE001
            self.metrics.storage_errors.labels("get_kv").inc()
            log.warning("could not read KV of %s/%s: %s", s.tenant, s.session_id, e)
            return None, 0, "missing"
        if blob is None:
            return None, 0, "missing"
        try:
            state = decode_kv(blob, model_fingerprint=self.runner.fingerprint)
            if state.quant_spec != self.quant.spec() or state.num_tokens != s.stored_kv_tokens:
                raise ContainerError(f"stored KV ({state.quant_spec}, {state.num_tokens} tokens) does not match "
                                     f"({self.quant.spec()}, {s.stored_kv_tokens} tokens)")
            return self.runner.restore_cache(state), state.num_tokens, None
        except (ContainerError, ValueError, KeyError) as e:
            log.warning("stored KV of %s/%s rejected: %s", s.tenant, s.session_id, e)
            return None, 0, "corrupt"

    # ---- leaving the device ---------------------------------------------------------------------------
    def persist(self, s: Session) -> None:
        """Write the durable history (manifest); the stored KV, if any, is kept."""
        try:
            s.redis_bytes = self.tier.put_manifest(s.manifest(self.runner.fingerprint, self.quant.spec()))
        except Exception as e:  # noqa: BLE001 - history stays on the device; retried at the next turn/offload
            self.metrics.storage_errors.labels("put_manifest").inc()
            log.warning("could not persist history of %s/%s: %s", s.tenant, s.session_id, e)

    def offload(self, s: Session) -> None:
        """Encode the KV, write KV + manifest to Redis atomically, free the device. Raises Unavailable on failure."""
        if s.cache is None:
            return
        state = s.cache.export_state()
        blob = encode_kv(state, model_fingerprint=self.runner.fingerprint, level=self.codec_level)
        previous = s.stored_kv_tokens
        s.stored_kv_tokens = state.num_tokens
        try:
            s.redis_bytes = self.tier.put_session(s.manifest(self.runner.fingerprint, self.quant.spec()), blob)
        except Exception as e:  # noqa: BLE001
            s.stored_kv_tokens = previous
            self.metrics.storage_errors.labels("offload").inc()
            raise Unavailable(f"offload of session {s.session_id!r} failed: storage unavailable ({type(e).__name__})") from None
        s.cache = None
        self.active.pop(s.key, None)
        self.metrics.offloads.inc()
        self.metrics.offload_bytes.inc(len(blob))
        if blob:
            self.metrics.compression_ratio.labels("zstd").set(state.nbytes / len(blob))
        self._update_gauges()

    def offload_idle(self, idle_timeout_s: float) -> int:
        now, n = time.time(), 0
        for s in list(self.active.values()):
            if not s.busy and not s.pinned and now - s.last_used >= idle_timeout_s:
                try:
                    self.offload(s)
                    n += 1
                except Unavailable as e:
                    log.warning("idle offload skipped: %s", e.message)
        return n

    def delete(self, tenant: str, session_id: str) -> bool:
        s = self.active.get((tenant, session_id))
        if s is not None:
            self.check_not_busy(s)
        self.active.pop((tenant, session_id), None)
        try:
            stored = self.tier.delete_session(tenant, session_id)
        except Exception as e:  # noqa: BLE001
            self.metrics.storage_errors.labels("delete").inc()
            raise Unavailable(f"session storage is unavailable: {type(e).__name__}") from None
        self._update_gauges()
        return stored or s is not None

    def _update_gauges(self) -> None:
        self.metrics.kv_bytes.labels("device").set(self.device_bytes())
        self.metrics.sessions.labels("active").set(len(self.active))
