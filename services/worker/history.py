"""`HistoryStore`: a worker's durable session records — the Redis manifest, mirrored in the local journal.

Every manifest the worker writes goes to the journal first (kvstore/tiers/journal.py), then to Redis. A
session Redis does not have (FLUSHALL, a wiped volume, an evicted manifest), holds corrupt, or cannot be
asked about (Redis down) is looked up in the journals; one found there is written back to Redis without
its stored KV — its KV is then recomputed from the history — and counted in
`kvstash_history_recoveries_total`. `check_epoch` notices a Redis that lost its data (the namespace's
epoch key is gone) and writes every journaled session back at once.

Invariants:
- A manifest is journaled before Redis is asked to store it, so no acknowledged history exists only in a
  Redis that can still lose it.
- A session deleted anywhere the journals can see is never brought back (tombstones, newest record wins).
- Sessions whose Redis write failed are `dirty` and written again by `retry_dirty` (housekeeping).
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Callable

from kvstore.storage import ContainerError, HistoryJournal, RedisTier, SessionManifest, StaleManifest
from services.errors import Internal, Unavailable
from services.metrics import WorkerMetrics
from services.worker.session import Session

log = logging.getLogger(__name__)


class HistoryStore:
    def __init__(self, tier: RedisTier, journal: HistoryJournal | None, metrics: WorkerMetrics,
                 fingerprint: str, quant_spec: str):
        self.tier, self.journal, self.metrics = tier, journal, metrics
        self.fingerprint, self.quant_spec = fingerprint, quant_spec
        self.epoch: bytes | None = None
        self._compacted = 0  # journal size after the last compaction

    @property
    def epoch_key(self) -> str:
        return f"{self.tier.namespace}:epoch"

    def manifest(self, s: Session, **kw) -> SessionManifest:
        return s.manifest(self.fingerprint, self.quant_spec, **kw)

    # ---- reading ------------------------------------------------------------------------------------
    def read(self, tenant: str, session_id: str) -> Session | None:
        """The session's durable record, from Redis or else the journals (then written back)."""
        try:
            record = self.tier.get_record(tenant, session_id)
        except ContainerError as e:
            log.error("manifest of %s/%s is corrupt: %s", tenant, session_id, e)
            s = self._from_journal(tenant, session_id, write_back=True)
            if s is None:
                raise Internal(f"session {session_id} has a corrupt history record") from None
            return s
        except Exception as e:  # noqa: BLE001 - Redis down: the journal may know the session
            self.metrics.storage_errors.labels("get_manifest").inc()
            s = self._from_journal(tenant, session_id, write_back=False)
            if s is None:
                raise Unavailable(f"session storage is unavailable: {type(e).__name__}") from None
            s.dirty = True
            return s
        if record is not None:
            return Session.from_manifest(*record)
        return self._from_journal(tenant, session_id, write_back=True)

    def _from_journal(self, tenant: str, session_id: str, write_back: bool) -> Session | None:
        raw = self.journal.lookup(tenant, session_id) if self.journal else None
        if raw is None:
            return None
        try:
            m = SessionManifest.decode(raw)
        except ContainerError as e:
            log.error("journaled manifest of %s/%s is corrupt: %s", tenant, session_id, e)
            return None
        if (m.tenant, m.session_id) != (tenant, session_id):
            return None
        m.blocks, m.kv_tokens = [], 0  # whatever KV it named may be gone: recompute from the history
        s = Session.from_manifest(m)
        self.metrics.history_recoveries.inc()
        log.warning("session %s/%s recovered from the local journal", tenant, session_id)
        if write_back and not self.write(s, expect_sha="*"):
            s.dirty = True
        return s

    # ---- writing ------------------------------------------------------------------------------------
    def record(self, s: Session) -> None:
        """Journal the session as it stands (after a commit made elsewhere, e.g. an offload)."""
        if self.journal is not None:
            self.journal.append(s.tenant, s.session_id, self.manifest(s).encode())

    def write(self, s: Session, expect_sha: str | None = None) -> bool:
        """Journal, then store the manifest (its stored KV unchanged). False if Redis failed (`s.dirty`)."""
        self.record(s)
        previous = s.held_blocks
        for _ in range(2):
            try:
                done = self.tier.commit_session(self.manifest(s), previous,
                                        expect_sha=expect_sha or s.manifest_sha or ("*" if s.referenced else ""))
                s.manifest_sha, s.dirty, s.referenced = done.sha1, False, True
                return True
            except StaleManifest:  # another writer's record: ours wins, without its (or our old) stored KV
                record = self.tier.get_record(s.tenant, s.session_id)
                log.warning("manifest of %s/%s was rewritten elsewhere; this worker's history wins",
                            s.tenant, s.session_id)
                previous = record[0].blocks if record else []
                s.blocks, s.stored_kv_tokens, s.manifest_sha = [], 0, (record[1] if record else None)
                expect_sha = None
            except Exception as e:  # noqa: BLE001 - kept on the device and in the journal; retried later
                self.metrics.storage_errors.labels("put_manifest").inc()
                log.warning("could not persist history of %s/%s: %s", s.tenant, s.session_id, e)
                break
        s.dirty = True
        return False

    def delete(self, tenant: str, session_id: str, remove: Callable[[str, str], bool] | None = None) -> bool:
        """Remove the session from Redis (and its blocks' references) with `remove` (by default the tier's
        `delete_session`); journal the deletion."""
        try:
            stored = (remove or self.tier.delete_session)(tenant, session_id)
        except Exception as e:  # noqa: BLE001
            self.metrics.storage_errors.labels("delete").inc()
            raise Unavailable(f"session storage is unavailable: {type(e).__name__}") from None
        if self.journal is not None:
            self.journal.append(tenant, session_id, None)
        return stored

    def maybe_compact(self, min_bytes: int = 64 << 20) -> None:
        """Rewrite this worker's journal file once it is past `min_bytes` and twice its last compacted size."""
        if self.journal is None:
            return
        size = self.journal.path.stat().st_size
        if size > max(min_bytes, 2 * self._compacted):
            self._compacted = self.journal.compact()

    # ---- recovery -----------------------------------------------------------------------------------
    def retry_dirty(self, sessions: list[Session]) -> int:
        return sum(self.write(s) for s in sessions if s.dirty and not s.busy)

    def check_epoch(self, sessions: list[Session]) -> int:
        """If Redis lost its data since this worker last looked, write every known history back.

        Returns the sessions written back (0 when nothing was lost). Raises if Redis does not answer."""
        epoch = self.tier.client.get(self.epoch_key)
        lost = epoch is None or (self.epoch is not None and epoch != self.epoch)
        if epoch is None:  # a new namespace, or a Redis that lost its data: restoring is harmless either way
            self.tier.client.set(self.epoch_key, secrets.token_hex(16).encode(), nx=True)
            epoch = self.tier.client.get(self.epoch_key)
        # (a changed epoch: another worker found it missing first and set a new one)
        self.epoch = epoch
        if not lost:
            return 0
        if sessions or self.journal is not None:
            log.warning("kvstash's Redis epoch is new: writing histories back from memory and the journal")
        return self._restore_journal(sessions)

    def _restore_journal(self, sessions: list[Session]) -> int:
        n = 0
        for s in sessions:  # what this worker holds: its in-memory history is the newest
            s.blocks, s.stored_kv_tokens, s.manifest_sha = [], 0, None
            n += self.write(s, expect_sha="*")
        held = {s.key for s in sessions}
        for tenant, sid, raw in (self.journal.live() if self.journal else []):
            if (tenant, sid) in held:
                continue
            try:
                m = SessionManifest.decode(raw)
                m.blocks, m.kv_tokens = [], 0
                self.tier.commit_session(m, [], expect_sha="")  # only where Redis has no record of it
                self.metrics.history_recoveries.inc()
                n += 1
            except StaleManifest:
                pass
            except ContainerError as e:
                log.error("journaled manifest of %s/%s is corrupt: %s", tenant, sid, e)
        return n
