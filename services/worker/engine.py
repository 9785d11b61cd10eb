"""`Engine`: a worker's model, sessions and scheduler, independent of Ray (the actor wraps it).

A generation request appends its input to the session's history, runs the not-yet-cached tokens
through the model in passes of its own (prefill chunks), then decodes one token per step: each step is a
`DecodeStep` the scheduler runs batched with the other sessions' steps (services/worker/batching.py).
Every pass is appended to the session's schedule with its shape (`Pass(tokens, rows)`, kvstore/schedule.py).
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Generator

import redis

from kvstore.schedule import Pass, encode_pass, passes
from kvstore.storage import LayoutMigration, MigrationReport, RedisTier
from services.config import KvstashConfig
from services.errors import (
    DeadlineExceeded,
    Internal,
    InvalidArgument,
    ResourceExhausted,
    Unavailable,
)
from services.metrics import WorkerMetrics
from services.runtime.redis_url import redis_client as client_for_url
from services.runtime.redis_url import redis_setting
from services.wire import (
    DoneEvent,
    GenerateCall,
    KvSource,
    PrefixSharedEvent,
    SessionInfo,
    StorageStats,
    TokensEvent,
    Usage,
    WorkerLoad,
)
from services.worker.batching import (
    Batcher,
    DecodeResult,
    DecodeStep,
    PrefillResult,
    PrefillStep,
    verified_prefill_sizes,
    verified_sizes,
)
from services.worker.gc_tuning import GcPauses, GcTuning
from services.worker.model_runner import Detokenizer, ModelRunner, Sampling
from services.worker.scheduler import Scheduler, Sink
from services.worker.session_manager import SessionManager
from services.worker.stops import StopMatcher

log = logging.getLogger(__name__)


def redis_client(cfg: KvstashConfig) -> redis.Redis:
    """One node or a Redis Cluster, by the form of `redis.url` (services/runtime/redis_url.py)."""
    return client_for_url(cfg.redis.url, cfg.redis.socket_timeout_s)


class Engine:
    def __init__(self, cfg: KvstashConfig, worker_id: str = "w0"):
        self.cfg, self.worker_id = cfg, worker_id
        self.metrics = WorkerMetrics()
        self._next_collect = time.monotonic() + cfg.tiers.collect_interval_s
        self._probe_rng = random.Random(f"kvstash-probe-{worker_id}")  # which decode steps get probed
        self._gc_tuning = GcTuning()  # the collector tuned for serving once started (services/worker/gc_tuning.py)
        # Everything that runs the model, loading and start-up checks included, runs on the engine thread
        # (services/worker/scheduler.py says why)
        self.scheduler = Scheduler(on_idle=self._housekeeping, idle_interval_s=cfg.session.idle_check_interval_s,
                                   prefill_tokens_per_step=cfg.batch.prefill_tokens_per_step, start=self._start)
        self._gc = GcPauses(self.metrics.gc_pause_seconds).install()  # every collection's pause, from now on

    def _start(self) -> Batcher:
        """Load the model, open the storage, verify the batch buckets; on the engine thread, before any call."""
        cfg = self.cfg
        self.runner = ModelRunner.from_config(cfg.model)
        self.runner.new_cache(cfg.quant)  # fail at start, not per request, when the spec cannot serve the model
        self.tier = RedisTier(redis_client(cfg), namespace=cfg.redis.namespace, ttl_s=cfg.redis.kv_ttl_s)
        self.sessions = SessionManager(self.runner, self.tier, cfg, self.metrics, self.worker_id)
        try:  # sessions stored with the pre-issue-17 key layout move first (a no-op once done)
            moved = LayoutMigration(self.tier).run()
            if moved != MigrationReport():
                log.info("legacy Redis key layout migrated: %s", moved)
            self.sessions.refresh_public()
            # the namespace's epoch, before any session: a new namespace is then not taken for a Redis that
            # lost its data at the first housekeeping (which would drop the stored KV of sessions made meanwhile)
            self.sessions.sync_storage()
            policy = redis_setting(self.tier.client.config_get("maxmemory-policy"), "maxmemory-policy")
            if policy.startswith("allkeys"):
                log.error("Redis maxmemory-policy is %s: Redis may evict session manifests (their durable "
                          "history) under memory pressure. Use volatile-lru with redis.kv_ttl_s > 0.", policy)
        except Exception as e:  # noqa: BLE001 - Redis down at start (the housekeeping loop retries) or no CONFIG
            log.warning("could not read Redis settings at start: %s", e)
        sizes = verified_sizes(self.runner, cfg.quant, cfg.batch.sizes,
                               on_failure=lambda n: self.metrics.batch_invariance_failures.labels(str(n)).inc())
        packed = verified_prefill_sizes(self.runner, cfg.quant, cfg.batch.prefill_sizes,
                                        on_failure=lambda n: self.metrics.prefill_invariance_failures.labels(str(n)).inc())
        self.batcher = Batcher(self.runner, sizes, on_pass=self._observe_pass, prefill_sizes=packed,
                               on_packed=self.metrics.prefill_packed.observe)
        self.metrics.batch_max_rows.set(self.batcher.max_rows)
        if cfg.batch.tune_gc:
            log.info("garbage collector tuned for serving: %d start-up objects frozen", self._gc_tuning.apply())
        return self.batcher

    def _packable(self, cache, ids: list[int]) -> bool:
        """May this prompt chunk go to a packed prefill pass (kvstore/quant/segments.py)?"""
        sizes = self.batcher.prefill_sizes
        return bool(sizes) and len(ids) <= sizes[-1] and cache.evictor is None

    def _check_quota(self, tenant: str, new: bool) -> None:
        """quota.max_sessions (for a new session) and quota.max_stored_bytes, from the tenant's Redis stats."""
        q = self.cfg.quota
        if not (q.max_stored_bytes or (new and q.max_sessions)):
            return
        try:
            st = self.tier.tenant_stats(tenant)
        except Exception:  # noqa: BLE001 - storage down: the history cannot be stored either; do not block on it
            return
        if new and q.max_sessions and st["sessions"] >= q.max_sessions:
            raise ResourceExhausted(f"tenant holds {st['sessions']} sessions, the limit is quota.max_sessions="
                                    f"{q.max_sessions}: delete some first")
        if q.max_stored_bytes and st["bytes"] >= q.max_stored_bytes:
            raise ResourceExhausted(f"tenant stores {st['bytes']} bytes, the limit is quota.max_stored_bytes="
                                    f"{q.max_stored_bytes}: delete some sessions first")

    def _observe_quality(self, cache) -> None:
        """Export the probe's per-layer attention KL and relative error (see kvstore.quant.probe)."""
        results, cache.probe = cache.probe or [], None
        if results:
            self.metrics.quality_samples.inc()
        for layer, kl, rel in results:
            self.metrics.quality_kl.labels(str(layer)).observe(kl)
            self.metrics.quality_error.labels(str(layer)).observe(rel)

    def _housekeeping(self) -> None:
        try:  # storage first: a Redis that lost its data gets the histories back before anything else
            self.sessions.sync_storage()
            self.sessions.refresh_public()
            self.metrics.storage_up.set(1)
        except Exception as e:  # noqa: BLE001 - storage down: serve from the device, retry next time
            self.metrics.storage_up.set(0)
            log.warning("storage housekeeping failed: %s", e)
        self.sessions.history.maybe_compact()
        self.sessions.offload_idle()
        self.metrics.queue_depth.set(self.scheduler.depth)
        every = self.cfg.tiers.collect_interval_s
        if every > 0 and time.monotonic() >= self._next_collect:
            self._next_collect = time.monotonic() + every
            try:
                res = self.tier.collect(self.cfg.tiers.collect_grace_s)
                log.info("block collection: %s", res)
            except Exception as e:  # noqa: BLE001 - storage down: try again next time
                log.warning("block collection failed: %s", e)

    # ---- generation ----------------------------------------------------------------------------
    def submit(self, call: GenerateCall, sink: Sink) -> int:
        """Schedule a call; ResourceExhausted (with a retry hint) when the worker is at its limit."""
        limit = self.cfg.session.max_requests_per_worker
        if self.scheduler.depth >= limit:
            self.metrics.rejected.inc()
            raise ResourceExhausted(f"worker {self.worker_id} is running its limit of {limit} requests "
                                    "(session.max_requests_per_worker); retry shortly", retry_after_s=1.0)
        return self.scheduler.submit(lambda s: self._generate(call, s), sink)

    def _encode_input(self, call: GenerateCall, history: list[int]) -> list[int]:
        first = not history
        inp = call.input or {}
        if "text" in inp:
            return self.runner.encode_text(inp["text"], first)
        if "chat" in inp and call.extends and history:
            return self.runner.encode_extension(inp["chat"], history)
        if "chat" in inp:
            return self.runner.encode_chat(inp["chat"], first, history)
        if "token_ids" in inp:
            ids = list(inp["token_ids"])
            bad = [i for i in ids if not 0 <= i < self.runner.vocab_size]
            if bad:
                raise InvalidArgument(f"token id {bad[0]} is outside the vocabulary [0, {self.runner.vocab_size})")
            return ids
        return []

    @staticmethod
    def _check_deadline(call: GenerateCall) -> None:
        if call.deadline is not None and time.time() > call.deadline:
            raise DeadlineExceeded("the call's deadline passed before it finished")

    def _generate(self, call: GenerateCall, sink: Sink) -> Generator[None, None, None]:
        limits = self.cfg.session
        max_new = call.max_new_tokens or limits.default_max_new_tokens
        if not 0 < max_new <= limits.max_new_tokens_limit:
            raise InvalidArgument(f"max_new_tokens={call.max_new_tokens} must be in [0, {limits.max_new_tokens_limit}]")
        if call.fork_of:
            s = self.sessions.fork(call.tenant, call.fork_of, call.session_id, fresh=call.fresh)
        else:
            s = self.sessions.acquire(call.tenant, call.session_id, create=call.create, fresh=call.fresh)
        touched = committed = False
        try:
            self._check_quota(call.tenant, new=not s.tokens or bool(call.fork_of))
            new_ids = self._encode_input(call, s.tokens)
            if not s.tokens and not new_ids:
                raise InvalidArgument("the prompt is empty: a new session needs input")
            if len(new_ids) > limits.max_prompt_tokens:
                raise InvalidArgument(f"input has {len(new_ids)} tokens, over the limit max_prompt_tokens={limits.max_prompt_tokens}")
            if len(s.tokens) + len(new_ids) + max_new > limits.max_session_tokens:
                raise InvalidArgument(f"session would exceed max_session_tokens={limits.max_session_tokens}")
            touched = True  # from here on the model runs on the session's cache
            s.tokens.extend(new_ids)
            origin = yield from self.sessions.ensure_kv(s)
            source, cached = origin.source, origin.cached_tokens
            pos = s.kv_tokens
            chunks = passes(pos, len(s.tokens), self.sessions.prefill_chunk)
            if not chunks:
                raise Internal("the session has no token to continue from")
            t_prefill = time.perf_counter()
            for n in chunks[:-1]:  # prefill in passes ending at chunk multiples (what sessions share)
                self._check_deadline(call)
                self.runner.forward(s.cache, s.tokens[pos:pos + n])
                s.schedule.append(encode_pass(Pass(n)))
                pos += n
                yield n
            pending = s.tokens[pos:]
            sampling = Sampling(call.temperature, call.top_p, call.seed)
            gen = sampling.generator(self.runner.device)
            detok, finish, produced = Detokenizer(self.runner), "length", 0
            stops = StopMatcher(call.stop)
            self.metrics.prefill_tokens.inc(len(s.tokens) - s.kv_tokens)
            fed = 0  # tokens of the call's own pass just before this step (the prompt's last chunk)
            for step in range(max_new):
                self._check_deadline(call)
                probing = len(pending) == 1 and self._probe_rng.random() < self.cfg.kv.quality_sample_rate
                s.cache.probe = [] if probing else None
                if len(pending) == 1:  # a decode step: batched with the other sessions' steps
                    result: DecodeResult = yield DecodeStep(s.cache, pending[0], fed)
                    fed = 0
                    logits, this_pass = result.logits, Pass(1, result.rows)
                elif self._packable(s.cache, pending):  # the prompt's last chunk, packed with other prompts'
                    prefilled: PrefillResult = yield PrefillStep(s.cache, pending)
                    logits, this_pass = prefilled.logits, prefilled.fed
                else:  # the prompt's last chunk: a pass of its own
                    logits, this_pass = self.runner.forward(s.cache, pending), Pass(len(pending))
                    fed = len(pending)
                if probing:
                    self._observe_quality(s.cache)
                s.schedule.append(encode_pass(this_pass))
                if step == 0:
                    if len(s.tokens) - cached >= self.sessions.block_tokens:  # a prefill, not a decode step
                        self.sessions.observe_prefill(len(s.tokens) - cached, time.perf_counter() - t_prefill)
                    if source == KvSource.NEW:
                        self.sessions.register_prefix(s)
                tok = self.runner.sample(logits, sampling, gen)
                s.tokens.append(tok)
                produced += 1
                self.metrics.generated_tokens.inc()
                text, hit = stops.push(detok.push(tok))
                sink(TokensEvent([tok], text))
                if hit:
                    finish = "stop_sequence"
                    break
                if tok in self.runner.eos_ids:
                    finish = "stop"
                    break
                pending = [tok]
            if rest := stops.flush():
                sink(TokensEvent([], rest))
            self.sessions.finish_call(s)
            committed = True
            sink(DoneEvent(finish, Usage(
                prompt_tokens=len(new_ids), cached_tokens=cached, generated_tokens=produced,
                kv_source=source, session_tokens=len(s.tokens), cached_tier=origin.tier)))
        finally:
            if committed:
                self.sessions.release(s)
            elif call.fork_of:  # a fork cut short leaves no session behind
                self.sessions.discard(s)
            else:
                # Cut short (an error, its deadline, a cancelled stream): the call leaves no trace. The
                # history is as it began, and a cache the model ran on (maybe half-updated) is dropped.
                self.sessions.rollback(s, touched)
                self.sessions.release(s)

    def _observe_pass(self, rows: int, sessions: int) -> None:
        """Count one batched decode pass (the batcher calls this after each)."""
        self.metrics.batch_rows.observe(rows)
        self.metrics.batch_sessions.observe(sessions)

    # ---- control operations (run on the engine thread) -------------------------------------------
    def info(self, tenant: str, session_id: str):
        """Future: the session's `SessionInfo`."""
        def op():
            s = self.sessions.get(tenant, session_id)
            try:
                redis_bytes = self.tier.session_bytes(tenant, session_id, s.blocks)
            except Exception:  # noqa: BLE001
                redis_bytes = s.redis_bytes
            return SessionInfo(session_id=session_id, state=s.state.value, token_count=s.durable_tokens,
                               device_bytes=s.device_bytes(), redis_bytes=redis_bytes,
                               worker=self.worker_id if s.cache is not None else "",
                               created_at=s.created_at, last_used_at=s.last_used, pinned=s.pinned)
        return self.scheduler.call(op)

    def pin(self, tenant: str, session_id: str, pinned: bool):
        """Set the session's pin (durably, in its manifest); a pinned session is never offloaded for idleness."""
        def op():
            s = self.sessions.get(tenant, session_id)  # a busy session is the running call's own object
            s.pinned = pinned
            if not self.sessions.persist(s):  # a pin must not fail silently
                raise Unavailable("session storage is unavailable: the pin is kept on this worker only")
            return pinned
        return self.scheduler.call(op)

    def mark_public(self, input: dict, sink: Sink) -> int:
        """Schedule sharing a prompt prefix with every tenant (MarkPublicPrefix); the sink gets a
        `PrefixSharedEvent` or an `ErrorEvent`. Chat input is rendered as the conversation's opening turns."""
        def task(sink: Sink) -> Generator[None, None, None]:
            if "chat" in input:
                ids = self.runner.render_chat(input["chat"])
            else:
                ids = self._encode_input(GenerateCall("", "", False, input), [])
            try:
                n, new = yield from self.sessions.mark_public(ids)
            except ValueError as e:
                raise InvalidArgument(str(e)) from None
            sink(PrefixSharedEvent(prompt_tokens=len(ids), shared_tokens=n, newly_registered=new))
        return self.scheduler.submit(task, sink)

    def prefix_match(self, tenant: str, input: dict):
        """Returns a Future of how many prompt tokens of `input` (as a new session's) this worker holds hot,
        for routing (0 when nothing is hot or the input does not encode)."""
        def op():
            if not self.sessions.has_hot_prefixes():  # nothing hot: no need to tokenize
                return 0
            try:
                ids = self._encode_input(GenerateCall(tenant, "", True, input), [])
            except InvalidArgument:
                return 0
            return self.sessions.hot_prefix_tokens(tenant, ids)
        return self.scheduler.call(op)

    def drain(self):
        """Returns a Future of the number of sessions offloaded: every session not busy leaves the device."""
        return self.scheduler.call(lambda: self.sessions.offload_idle(everything=True))

    def refresh_public(self):
        return self.scheduler.call(self.sessions.refresh_public)

    def evict(self, tenant: str, session_id: str):
        def op():
            self.sessions.offload(self.sessions.check_not_busy(self.sessions.get(tenant, session_id)))
            return True
        return self.scheduler.call(op)

    def delete(self, tenant: str, session_id: str):
        return self.scheduler.call(lambda: self.sessions.delete(tenant, session_id))

    def holds(self, tenant: str, session_id: str) -> bool:
        """Whether calls for the session must come here: it runs here, is hot here, or its newest history
        is here only (Redis missed its last write)."""
        return self.sessions.holding(tenant, session_id) is not None

    def occupancy(self) -> WorkerLoad:
        """How busy this worker is (the router's load signal): queue depth, device bytes, active sessions. Any
        thread may ask: the device bytes are those the engine thread last summed (at most a second old under
        load), never read from the caches here — their windows join lazily on the engine thread."""
        return WorkerLoad(queue_depth=self.scheduler.depth, device_bytes=self.sessions.device_total,
                          active_sessions=len(self.sessions.active))

    def metrics_snapshot(self) -> list[dict]:
        self.metrics.queue_depth.set(self.scheduler.depth)
        return self.metrics.snapshot()

    def storage_stats(self) -> StorageStats:
        st = self.tier.stats()
        return StorageStats(bytes=st["bytes"], sessions=st["sessions"], blocks=st["blocks"])

    def close(self) -> None:
        self.scheduler.stop()
        self._gc.remove()
        self._gc_tuning.undo()  # a closed engine's objects must not stay frozen (gc_tuning.py)

