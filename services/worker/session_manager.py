"""`SessionManager`: a worker's sessions, their tiers, and the offload/restore/recompute paths.

Only ACTIVE sessions (KV on the device) live in memory; a cold session is its Redis manifest (the
durable token history) plus, usually, stored KV blocks (`CacheStore` over the library's `SessionStore`).
All methods run on the engine thread. The engine reaches storage only through the methods here
(`prefill_chunk`, `block_tokens`, `observe_prefill`, `register_prefix`, `hot_prefix_tokens`,
`has_hot_prefixes`, `refresh_public`, `mark_public`).

Invariants:
- Restoring gives a cache bit-identical to the one offloaded (the codec is lossless, blocks are shared
  only when bit-identical, and the manifest's fingerprint and quant spec must match), so greedy
  continuation is unchanged.
- When stored KV is missing or corrupt, the KV is rebuilt by replaying the recorded forward schedule
  over the token history (SEAL entries included, or the stored canonical prefix they stand for): the same
  forward passes in the same order, hence the same KV bit for bit. Each rebuild is counted in
  `kvstash_recomputes_total`. When the stored KV covers fewer tokens than the schedule, it is loaded and
  the rest replayed.
- A failed Redis write never loses device state: the session stays ACTIVE and the error is counted.
- A call is atomic (`Session.begin/commit/rollback`): a call cut short leaves the history as it was. If it
  had touched the KV, the device copy is dropped (the next call restores or rebuilds it exactly); a
  session whose newest history is then only in the journal stays in memory (`unsaved`) until Redis has it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Generator
from dataclasses import dataclass

from kvstore.digest import hash_fields
from kvstore.schedule import SEAL, adopted_schedule, boundaries, canonical_tokens, replay_passes, schedule_tokens
from kvstore.storage import HistoryJournal, OffloadPolicy, RedisTier, Resident
from services.config import KvstashConfig, kvstash_home
from services.errors import AlreadyExists, FailedPrecondition, NotFound, Unavailable
from services.metrics import WorkerMetrics
from services.wire import KvSource, Tier
from services.worker.history import HistoryStore
from services.worker.model_runner import ModelRunner
from services.worker.session import Session
from services.worker.session_store import AdoptedPrefix, CacheStore, RestoredCache

log = logging.getLogger(__name__)
GAUGE_INTERVAL_S = 1.0  # the end of a call updates the KV byte gauges at most this often (housekeeping always does)



@dataclass(frozen=True)
class KvOrigin:
    """Where a call's cached KV came from at its start: the source, how many tokens it covers, and the tier
    (Tier.NONE when nothing was cached or the KV was rebuilt)."""

    source: KvSource
    cached_tokens: int = 0
    tier: Tier = Tier.NONE


class SessionManager:
    def __init__(self, runner: ModelRunner, tier: RedisTier, cfg: KvstashConfig, metrics: WorkerMetrics,
                 worker_id: str = "w0"):
        self.runner, self.tier, self.metrics = runner, tier, metrics
        self._gauges_at = 0.0  # when the end of a call last updated the gauges (monotonic)
        # device bytes of every active session as last summed on the engine thread: what other threads read (a
        # cache is only ever touched by the engine thread; reading its tensors elsewhere would race its updates)
        self.device_total = 0
        self.quant = cfg.quant
        self.store = CacheStore(runner, tier, cfg, metrics)
        self.prefill_chunk, self.block_tokens = self.store.prefill_chunk, self.store.block_tokens
        self.history = HistoryStore(tier, journal_for(cfg, worker_id), metrics, runner.fingerprint, self.quant.spec())
        self.policy = OffloadPolicy(cfg.session.idle_timeout_s, cfg.tiers.device_bytes)
        self.active: dict[tuple[str, str], Session] = {}  # KV on the device
        self.working: dict[tuple[str, str], Session] = {}  # a call runs on it (KV on the device or not yet)
        self.unsaved: dict[tuple[str, str], Session] = {}  # no KV on the device, history not yet in Redis (dirty)

    # ---- lookup --------------------------------------------------------------------------------
    def find(self, tenant: str, session_id: str) -> Session | None:
        """The session, from memory or from its Redis manifest (then COLD, not yet registered)."""
        s = self.holding(tenant, session_id)
        return s if s is not None else self.history.read(tenant, session_id)

    def holding(self, tenant: str, session_id: str) -> Session | None:
        """The session if this worker holds it in memory (running, on the device, or not yet in Redis)."""
        key = (tenant, session_id)
        return self.working.get(key) or self.active.get(key) or self.unsaved.get(key)

    def held(self) -> list[Session]:
        """Every session this worker holds in memory, whose history it may know better than Redis."""
        return list({**self.unsaved, **self.active, **self.working}.values())  # a running hot session is in two

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

    def acquire(self, tenant: str, session_id: str, create: bool, fresh: bool = False) -> Session:
        """The session, marked busy. `fresh`: the id was just made by the server, so no store is asked (a
        new session starts even while Redis is down)."""
        if fresh:
            s = Session(tenant=tenant, session_id=session_id)
        else:
            s = self.find(tenant, session_id) if create else self.get(tenant, session_id)
        s = self.check_not_busy(s or Session(tenant=tenant, session_id=session_id))
        s.begin()
        self.working[s.key] = s
        self.unsaved.pop(s.key, None)
        return s

    def fork(self, tenant: str, parent_id: str, session_id: str, fresh: bool = False) -> Session:
        """A new session `session_id`, marked busy, that starts as a copy of the tenant's session `parent_id`
        (`Session.fork`): a device copy of the parent's cache if it has one, else the parent's stored blocks,
        which the new session restores (or replays) like its own. The parent is unchanged; as the older
        branch it is the first to leave the device (its last use is set to the epoch, so housekeeping
        offloads it as idle). NotFound: no parent;
        FailedPrecondition: the parent is busy; AlreadyExists: `session_id` names a session (not asked when
        `fresh`, an id the server just made)."""
        parent = self.check_not_busy(self.get(tenant, parent_id))
        if not fresh and self.find(tenant, session_id) is not None:
            raise AlreadyExists(f"session {session_id!r} already exists: a fork starts a new session")
        s = parent.fork(session_id)
        if parent.cache is not None:
            s.cache = self.runner.clone_cache(parent.cache)
            parent.last_used = 0.0
        s.begin()
        self.working[s.key] = s
        self.metrics.forks.inc()
        return s

    def discard(self, s: Session) -> None:
        """Forget a session this worker made and never wrote (a fork whose first call failed)."""
        s.end()
        s.cache = None
        for held in (self.working, self.active, self.unsaved):
            held.pop(s.key, None)
        self._update_gauges()

    def device_bytes(self) -> int:
        """Device bytes held by every active session (measured from tensor storages)."""
        return sum(s.device_bytes() for s in list(self.active.values()))

    def finish_call(self, s: Session) -> bool:
        """The running call's tokens join the history (`Session.commit`), durably (journal, then Redis; see
        `persist`)."""
        s.commit()
        s.dirty = True  # until a write succeeds
        return self.persist(s)

    def rollback(self, s: Session, touched: bool) -> None:
        """Undo a call cut short. `touched`: it ran the model on the cache (which may be half-updated, or
        ahead of the history it returns to), so the device copy is dropped."""
        drop = s.rollback() or touched
        if drop:
            s.cache = None
            self.active.pop(s.key, None)
        self.metrics.rolled_back.labels("dropped" if drop else "kept").inc()

    def release(self, s: Session) -> None:
        s.end()
        self.working.pop(s.key, None)
        s.last_used = time.time()
        if s.cache is not None:
            s.cache.drop_views()  # decode scratch: an idle session holds its quantized state only
            self.active[s.key] = s
        elif s.dirty and s.tokens:
            self.unsaved[s.key] = s
        if time.monotonic() - self._gauges_at >= GAUGE_INTERVAL_S:  # not at every call's end: the sum walks the
            self._update_gauges()                                     # running sessions' tensors

    # ---- bringing KV to the device ----------------------------------------------------------------
    def ensure_kv(self, s: Session) -> Generator[None, None, KvOrigin]:
        """Make `s.cache` cover `s.schedule`; yields between replayed passes.

        A session with no KV yet may adopt a stored prefix of its tokens (source KvSource.PREFIX)."""
        if s.cache is not None:
            return KvOrigin(KvSource.DEVICE, s.kv_tokens, Tier.DEVICE)
        if not s.schedule:
            adoption = self.adopt_prefix(s.tenant, s.tokens)
            if adoption is None:
                s.cache = self.runner.new_cache(self.quant)
                self.metrics.prefix_lookups.labels("miss").inc()
                return KvOrigin(KvSource.NEW)
            s.cache, s.schedule = adoption.cache, adopted_schedule(adoption.tokens, self.prefill_chunk)
            self.metrics.prefix_lookups.labels("hit").inc()
            per_block = self.block_tokens
            self.metrics.prefix_hit_tokens.labels(Tier.DEVICE).inc(adoption.from_trie * per_block)
            self.metrics.prefix_hit_tokens.labels(Tier.REDIS).inc(adoption.from_redis * per_block)
            return KvOrigin(KvSource.PREFIX, adoption.tokens, Tier.REDIS if adoption.from_redis else Tier.DEVICE)
        t0 = time.perf_counter()
        restored: RestoredCache = self.store.restore(s)
        cache, tier, reason = restored.cache, restored.tier, restored.reason
        replayed = yield from self._replay(s, cache)
        source = KvSource.RESTORED if replayed == 0 else KvSource.RECOMPUTED
        if replayed:
            self.metrics.recomputes.labels(reason if cache is None else "stale").inc()
            self.metrics.prefill_tokens.inc(replayed)
            log.warning("session %s/%s: rebuilt %d tokens of KV by replay (%s)", s.tenant, s.session_id, replayed,
                        reason if cache is None else "stale")
        else:
            self.metrics.restores.inc()
        self.metrics.restore_seconds.labels(source).observe(time.perf_counter() - t0)
        return KvOrigin(source, s.kv_tokens, tier if source == KvSource.RESTORED else Tier.NONE)

    def _replay(self, s: Session, cache) -> Generator[int, None, int]:
        """Run the schedule entries `cache` does not cover (all of them when it is None); returns tokens run.

        Each pass runs with the shape it was recorded with (kvstore/schedule.py): a pass of its own, or rows
        of a batched pass — packed, up to its row count, into one pass (`replay_passes`)."""
        schedule, start, done = s.schedule, 0, 0
        if cache is not None:  # the stored KV covers a prefix of the schedule ending at a pass boundary
            start = max(i for i, t in enumerate(boundaries(schedule)) if t == s.stored_kv_tokens)
            done = s.stored_kv_tokens
        elif SEAL in schedule:  # the session adopted a canonical prefix: take it from storage if still there
            j = schedule.index(SEAL)
            prefix = schedule_tokens(schedule[:j])
            if canonical_tokens(schedule[:j], self.prefill_chunk) == prefix:
                adoption = self.adopt_prefix(s.tenant, s.tokens[:prefix + 1])
                if adoption is not None and adoption.tokens == prefix:
                    cache, start, done = adoption.cache, j + 1, prefix
        cache = cache if cache is not None else self.runner.new_cache(self.quant)
        replayed = 0
        for p in replay_passes(schedule[start:], pack=cache.evictor is None):
            if p is None:
                cache.seal_all()
                continue
            self.runner.run_pass(cache, s.tokens[done:done + p.tokens], p)
            done += p.tokens
            replayed += p.tokens
            yield p.tokens
        s.cache = cache
        return replayed

    # ---- leaving the device ---------------------------------------------------------------------------
    def persist(self, s: Session) -> bool:
        """Write the durable history (journal, then Redis); the stored KV, if any, is kept. False when Redis
        failed: the session is then dirty, kept on the device and in the journal, and written again later."""
        return self.history.write(s)

    def offload(self, s: Session) -> None:
        """Store the KV as blocks, write the manifest, free the device. Raises Unavailable on failure."""
        if s.cache is None:
            return
        try:
            s.redis_bytes = self.store.save(s)
            s.dirty = False
        except Exception as e:  # noqa: BLE001
            self.history.record(s)
            self.metrics.storage_errors.labels("offload").inc()
            log.warning("offload of %s/%s failed: %s", s.tenant, s.session_id, e)
            raise Unavailable(f"offload of session {s.session_id!r} failed: storage unavailable ({type(e).__name__})") from None
        self.history.record(s)
        s.cache = None
        self.active.pop(s.key, None)
        self.metrics.offloads.inc()
        self._update_gauges()

    def sync_storage(self) -> None:
        """Housekeeping: after Redis lost its data write every held history back, and write the dirty ones
        again. Raises if Redis does not answer."""
        held = self.held()
        self.history.check_epoch(held)
        self.history.retry_dirty(held)
        for key in [k for k, s in self.unsaved.items() if not s.dirty]:
            del self.unsaved[key]

    def offload_idle(self, everything: bool = False) -> int:
        """Offload what the policy picks: idle sessions, then least-recently-used ones over the device budget
        (`everything`: every session not busy, pinned ones too — the worker is going away)."""
        residents = [Resident(s.key, s.last_used, s.device_bytes(), s.busy, s.pinned and not everything)
                     for s in self.active.values()]
        now = time.time() + (float("inf") if everything else 0.0)
        n = 0
        for key in self.policy.victims(residents, now):
            try:
                self.offload(self.active[key])
                n += 1
            except Unavailable as e:
                log.warning("offload skipped: %s", e.message)
        self._update_gauges()
        return n

    def register_prefix(self, s: Session) -> None:
        """After a new session's first prefill: keep its canonical blocks hot for later sessions."""
        try:
            self.store.register_prefix(s)
        except Exception:  # an optimisation only
            log.exception("prefix registration of %s/%s failed", s.tenant, s.session_id)

    # ---- what the engine asks of stored KV ---------------------------------------------------------------
    def adopt_prefix(self, tenant: str, tokens: list[int]) -> AdoptedPrefix | None:
        """The longest stored canonical prefix of `tokens` worth restoring, as a device cache, or None."""
        return self.store.adopt(tenant, tokens)

    def observe_prefill(self, tokens: int, seconds: float) -> None:
        """A measured prefill, for the restore-or-recompute cost model."""
        self.store.observe_prefill(tokens, seconds)

    def hot_prefix_tokens(self, tenant: str, tokens: list[int]) -> int:
        """Prompt tokens a new session of `tenant` would adopt from this worker's trie (routing probe)."""
        return self.store.hot_tokens(tenant, tokens)

    def has_hot_prefixes(self) -> bool:
        return self.store.has_hot_prefixes()

    def refresh_public(self) -> int:
        """Reload the registry of public prefixes; returns the blocks it names."""
        return self.store.refresh_public()

    def mark_public(self, tokens: list[int]) -> Generator[None, None, tuple[int, bool]]:
        """Share the canonical prefix of `tokens` with every tenant (yields between prefill passes); returns
        (tokens shared, whether newly registered). ValueError when sharing is off or no whole chunk."""
        published = yield from self.store.mark_public(tokens)
        return published.tokens, published.registered

    def delete(self, tenant: str, session_id: str) -> bool:
        s = self.holding(tenant, session_id)
        if s is not None:
            self.check_not_busy(s)
        stored = self.history.delete(tenant, session_id, self.store.delete)
        self.active.pop((tenant, session_id), None)
        self.unsaved.pop((tenant, session_id), None)
        self._update_gauges()
        return stored or s is not None

    def _update_gauges(self) -> None:
        self._gauges_at = time.monotonic()
        self.device_total = self.device_bytes()
        self.metrics.kv_bytes.labels(Tier.DEVICE).set(self.device_total)
        self.metrics.kv_bytes.labels(Tier.HOST).set(self.store.host_bytes)
        self.metrics.kv_bytes.labels("prefix_trie").set(self.store.trie_bytes)
        self.metrics.sessions.labels("active").set(len(self.active))


def journal_for(cfg: KvstashConfig, worker_id: str) -> HistoryJournal | None:
    """The worker's history journal: one directory per Redis (address without credentials) and namespace,
    shared by the workers that use it, so they can recover each other's sessions."""
    if not cfg.tiers.journal:
        return None
    base = cfg.tiers.journal_dir or str(kvstash_home() / "journal")
    where = cfg.redis.url.rsplit("@", 1)[-1]  # never the password
    scope = hash_fields([where, cfg.redis.namespace], person=b"kvstash-journal").hex()[:16]
    return HistoryJournal(f"{base}/{cfg.redis.namespace}-{scope}", worker_id)
