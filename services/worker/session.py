"""`Session`: a tenant's conversation as one worker holds it.

Invariants:
- `tokens` is the whole history, the durable truth; the KV is a cache of it.
- `schedule` lists the forward passes that built the KV, in order (kvstore/schedule.py), so the KV can be
  rebuilt bit-exactly by replaying them. `schedule_tokens(schedule) == cache.get_seq_length()` while the
  cache is on the device, and `schedule_tokens(schedule) <= len(tokens)` always (the last sampled token is not yet fed).
- At most one request works on a session at a time (`busy`).
- Calls are atomic: while one runs, `base` holds the history and schedule as they stood when it began,
  and every manifest written meanwhile (a pin, a Redis epoch write-back) records that durable state,
  never the call's half-done input and output. `commit` makes the call's tokens durable; `rollback`
  undoes a call cut short (cancelled, failed, past its deadline), so a retry starts where the first
  attempt did.
"""

from __future__ import annotations

import enum
import time
import weakref
from dataclasses import dataclass, field

from kvstore.device import QuantizedKVCache
from kvstore.schedule import schedule_tokens
from kvstore.storage import BlockRef, SessionManifest


class State(enum.Enum):
    ACTIVE = "active"  # KV on the device
    COLD = "cold"  # KV (and history) in Redis only


@dataclass
class Session:
    tenant: str
    session_id: str
    tokens: list[int] = field(default_factory=list)
    schedule: list[int] = field(default_factory=list)
    cache: QuantizedKVCache | None = None
    created_at: float = field(default_factory=time.time)
    last_used: float = field(default_factory=time.time)
    stored_kv_tokens: int = 0  # tokens covered by the KV copy in Redis (0: none)
    blocks: list[BlockRef] = field(default_factory=list)  # the stored KV: blocks then the tail (manifest records)
    manifest_sha: str | None = None  # compare-and-set tag of the manifest this worker last wrote or read
    redis_bytes: int = 0
    pinned: bool = False  # never offloaded for idleness (durable: kept in the manifest)
    dirty: bool = False  # the last Redis write of its history failed (it is in the journal): write it again
    base: tuple[int, list[int]] | None = None  # while a call runs (busy): (len(tokens), schedule) when it began
    referenced: bool = True  # a Redis record of this session references `blocks` (False: a fork not yet written)
    # (weak ref to the cache, its tokens, bytes) measured while idle: an idle session's cache does not change, and the worker
    # sums every active session's bytes at each call's end (an O(sessions x layers x tensors) walk otherwise)
    _bytes_seen: tuple[object, int, int] | None = field(default=None, repr=False, compare=False)

    @property
    def key(self) -> tuple[str, str]:
        return (self.tenant, self.session_id)

    @property
    def state(self) -> State:
        return State.ACTIVE if self.cache is not None else State.COLD

    @property
    def busy(self) -> bool:
        return self.base is not None

    @property
    def committed(self) -> tuple[int, list[int]]:
        """(history length, schedule) of the committed history: a running call's tokens are not part of it."""
        return self.base if self.base is not None else (len(self.tokens), self.schedule)

    @property
    def durable_tokens(self) -> int:
        return self.committed[0]

    def commit(self) -> None:
        """The running call's input and output join the durable history (at its end)."""
        self.base = (len(self.tokens), list(self.schedule))

    def begin(self) -> None:
        """A call starts: the session is busy, and what it holds now is the committed state."""
        self.commit()

    def rollback(self) -> bool:
        """Undo the running call's uncommitted tokens and passes; True if it had made any."""
        n, schedule = self.committed
        changed = len(self.tokens) != n or self.schedule != schedule
        del self.tokens[n:]
        self.schedule = list(schedule)
        return changed

    def end(self) -> None:
        self.base = None

    @property
    def held_blocks(self) -> list[BlockRef]:
        """The blocks this session's Redis record holds references to (what its next write releases)."""
        return self.blocks if self.referenced else []

    def fork(self, session_id: str) -> Session:
        """A new session `session_id` of the same tenant with this one's committed history and schedule, listing
        its stored KV (`blocks`, not yet referenced by a record of the new session: its first write takes
        references of its own, so either session's deletion leaves the other's KV stored). The device cache is
        the caller's to copy; this session is unchanged."""
        n, schedule = self.committed
        return Session(tenant=self.tenant, session_id=session_id, tokens=self.tokens[:n], schedule=list(schedule),
                       stored_kv_tokens=self.stored_kv_tokens, blocks=list(self.blocks), referenced=False)

    @property
    def kv_tokens(self) -> int:
        return schedule_tokens(self.schedule)

    def device_bytes(self) -> int:
        """Device bytes of the cache (decode views included), measured; remembered while the session is idle."""
        c, seen = self.cache, self._bytes_seen
        if c is None:
            self._bytes_seen = None
            return 0
        if not self.busy and seen is not None and seen[0]() is c and seen[1] == c.get_seq_length():
            return seen[2]
        n = c.device_bytes()
        self._bytes_seen = None if self.busy else (weakref.ref(c), c.get_seq_length(), n)
        return n

    def manifest(self, fingerprint: str, quant_spec: str, blocks: list[BlockRef] | None = None,
                 kv_tokens: int | None = None) -> SessionManifest:
        """The durable record (the committed history while a call runs): by default the stored KV it lists is
        the one already stored."""
        n, schedule = self.committed
        return SessionManifest(
            tenant=self.tenant, session_id=self.session_id, tokens=self.tokens[:n], schedule=list(schedule),
            kv_tokens=self.stored_kv_tokens if kv_tokens is None else kv_tokens, model_fingerprint=fingerprint,
            quant_spec=quant_spec, created_at=self.created_at, updated_at=time.time(), pinned=self.pinned,
            blocks=list(self.blocks if blocks is None else blocks),
        )

    @classmethod
    def from_manifest(cls, m: SessionManifest, sha1: str | None = None) -> Session:
        return cls(tenant=m.tenant, session_id=m.session_id, tokens=list(m.tokens), schedule=list(m.schedule),
                   created_at=m.created_at, last_used=m.updated_at, stored_kv_tokens=m.kv_tokens, pinned=m.pinned,
                   blocks=list(m.blocks), manifest_sha=sha1)
