"""The wire between the gateway and the workers: every message that crosses the Ray boundary, typed.

The gateway sends a `GenerateCall` to a worker actor's `generate` stream and gets back `TokensEvent`s, then
exactly one terminal event: a `DoneEvent` (with its `Usage`) or an `ErrorEvent`. `MarkPublicPrefix`'s
task ends with a `PrefixSharedEvent` or an `ErrorEvent`; a worker's unary methods answer their typed
reply (`WorkerReady`, `WorkerLoad`, `SessionInfo`, `SessionPage`, `StorageStats`, a bool or an int) or
an `ErrorEvent`. (Metric snapshots keep `services.metrics`' own family format.) The names both sides must agree on are defined here once: KV sources (`KvSource`) and
tiers (`Tier`), with the string values of the proto mapping; the limits the gateway validates and the
worker relies on (`MAX_STOPS`, `MAX_STOP_CHARS`); the tenant/session id rule (`ID_RE`); and the worker
actors' names (`actor_name`).

Invariants:
- This module imports only the standard library and `services.errors`: importing it (as the gateway does)
  pulls in no torch, transformers, numba or Ray.
- Every message is a dataclass whose fields are builtins (str, int, float, bool, None, lists and dicts of
  them) or other messages of this module. Ray pickles them inside its own transport; nothing here is ever
  stored, so no stored bytes are ever unpickled.
- Usage's `kv_source` and `cached_tier` are plain `str` values of `KvSource` and `Tier` (checked when
  built), so an unknown name fails in the worker that made it, not in the gateway that maps it.
- Errors travel as (code, message, retry hint), never as pickled exception objects.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from enum import StrEnum

from services.errors import KvstashError, error_for

# ---- names and limits both sides share -------------------------------------------------------------

# A tenant or session id. kvstore/tiers/manifest.py keeps an identical copy (the library must not import
# services); tests/services/test_wire.py asserts they are equal.
ID_RE = re.compile(r"[A-Za-z0-9._-]{1,128}")

MAX_STOPS = 8  # stop sequences per call
MAX_STOP_CHARS = 256  # characters per stop sequence

ACTOR_PREFIX = "kvstash-worker-"  # worker actor i is the Ray named actor f"{ACTOR_PREFIX}{i}"


def actor_name(index: int) -> str:
    """The Ray name of worker `index` (its worker id is f"w{index}")."""
    return f"{ACTOR_PREFIX}{index}"


class KvSource(StrEnum):
    """Where a call's cached KV came from (kvstash.v1.KvSource)."""

    NEW = "new"  # nothing cached: the whole prompt was prefilled
    DEVICE = "device"  # the session was hot on the worker
    RESTORED = "restored"  # decoded from stored blocks, no prefill
    RECOMPUTED = "recomputed"  # rebuilt (at least partly) by replaying the schedule
    PREFIX = "prefix"  # a new session adopted a stored canonical prefix


class Tier(StrEnum):
    """Where KV is held (kvstash.v1.Tier); NONE when nothing was cached."""

    NONE = ""
    DEVICE = "device"
    HOST = "host"
    REDIS = "redis"


# ---- the call -------------------------------------------------------------------------------------

@dataclass
class GenerateCall:
    """A Generate/ResumeSession call as the worker sees it (tenant already authenticated, fields validated
    by the gateway: ids match ID_RE, at most MAX_STOPS stops of 1..MAX_STOP_CHARS characters)."""

    tenant: str
    session_id: str
    create: bool  # Generate may create; ResumeSession may not
    input: dict | None  # {"text": str} | {"chat": [{"role", "content"}]} | {"token_ids": [int]} | None
    max_new_tokens: int = 0
    temperature: float = 0.0
    top_p: float = 0.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)  # stop sequences (validated by the gateway)
    deadline: float | None = None  # unix time after which the call is abandoned (the client's gRPC deadline)
    fresh: bool = False  # the server just made the session id: no store needs asking whether it exists
    # input.chat is the whole conversation: the session's tokens must begin its rendering (else
    # FailedPrecondition), and only the rest is new (the HTTP API's transparent continuation)
    extends: bool = False
    # a fork: `session_id` is a new session that starts as a copy of this session of the tenant (its
    # history, schedule and KV; its stored blocks shared by reference), which stays unchanged
    fork_of: str = ""


# ---- events -------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Usage:
    """A finished call's accounting: tokens of its input, taken from cache, generated, and in the session
    afterwards; where the cached KV came from and from which tier."""

    prompt_tokens: int
    cached_tokens: int
    generated_tokens: int
    kv_source: str  # a KvSource value
    session_tokens: int
    cached_tier: str = Tier.NONE.value  # a Tier value

    def __post_init__(self):  # store plain str (not the enum), and refuse names the gateway cannot map
        object.__setattr__(self, "kv_source", KvSource(self.kv_source).value)
        object.__setattr__(self, "cached_tier", Tier(self.cached_tier).value)


@dataclass(frozen=True)
class TokensEvent:
    """Tokens generated since the last event and the text they complete (`ids` may be empty when held-back
    text is released at the end; `text` never contains part of a stop sequence)."""

    ids: list[int]
    text: str


@dataclass(frozen=True)
class DoneEvent:
    """The call finished: "length", "stop" (an end-of-sequence token) or "stop_sequence"."""

    finish_reason: str
    usage: Usage


@dataclass(frozen=True)
class PrefixSharedEvent:
    """MarkPublicPrefix finished: the prompt's tokens, how many of them are shared (whole prefill chunks),
    and whether this call registered the prefix (False: it was public already)."""

    prompt_tokens: int
    shared_tokens: int
    newly_registered: bool


@dataclass(frozen=True)
class ErrorEvent:
    """A failure: a `KvstashError`'s code (a grpc.StatusCode name), message and retry hint, as data."""

    code: str
    message: str
    retry_after_s: float | None = None

    @classmethod
    def of(cls, exc: KvstashError) -> ErrorEvent:
        retry = exc.retry_after_s
        return cls(exc.code, exc.message, float(retry) if retry is not None else None)

    def exception(self) -> KvstashError:
        """The error to raise on this side (INTERNAL for a code this side does not know)."""
        return error_for(self.code, self.message, self.retry_after_s)


# ---- replies of the workers' unary methods (each may also answer an ErrorEvent) -------------------------

@dataclass(frozen=True)
class WorkerReady:
    """A worker that has loaded its model: its id, the model's fingerprint and the device it runs on."""

    worker: str
    fingerprint: str
    device: str


@dataclass(frozen=True)
class WorkerLoad:
    """A worker's load as polled: requests running or queued, KV bytes on the device, active sessions."""

    queue_depth: int = 0
    device_bytes: int = 0
    active_sessions: int = 0


@dataclass(frozen=True)
class SessionInfo:
    """GetSession's answer: `state` is "active" (KV on the device of `worker`) or "cold" (stored only;
    `worker` is "")."""

    session_id: str
    state: str
    token_count: int
    device_bytes: int
    redis_bytes: int
    worker: str
    created_at: float
    last_used_at: float
    pinned: bool = False


@dataclass(frozen=True)
class StoredSession:
    """One row of ListSessions: a session's durable record in Redis."""

    session_id: str
    token_count: int
    created_at: float
    last_used_at: float
    redis_bytes: int


@dataclass(frozen=True)
class SessionPage:
    """A page of a tenant's stored sessions; `cursor` 0 means there are no more."""

    cursor: int
    sessions: list[StoredSession]


@dataclass(frozen=True)
class StorageStats:
    """Totals over every scope in Redis."""

    bytes: int = 0
    sessions: int = 0
    blocks: int = 0


Event = TokensEvent | DoneEvent | PrefixSharedEvent | ErrorEvent
TERMINAL = (DoneEvent, PrefixSharedEvent, ErrorEvent)  # a task's last event: exactly one per task


def is_terminal(ev: Event) -> bool:
    return isinstance(ev, TERMINAL)
