"""`SessionManifest`: a session's durable record — its whole token history, how its KV was built, and
which stored blocks hold that KV.

Stored as a container (kind MANIFEST, codec RAW). Meta holds the ids, quant spec, model fingerprint,
timestamps and record lengths; the payload is the token ids as little-endian uint32, then the schedule
run-length encoded as little-endian uint32 (value, count) pairs (a schedule is mostly 1,1,1...), then
(version 2) one 65-byte record per stored KV block: a flags byte (bit 0: public scope), the block's key
digest and its content hash. The blocks are the sealed blocks in order, then the tail (window etc.).

Schedule entries are forward passes (tokens fed, rows of the pass) or `SEAL`, encoded as kvstore/schedule.py
says; replaying the schedule reproduces the KV bit for bit.

Invariants (checked by `validate` on encode and on decode; a violation raises ContainerError):
- `tenant` and `session_id` match `[A-Za-z0-9._-]{1,128}`.
- Every token id is an int in [0, 2^32); every schedule entry encodes a pass or is SEAL (kvstore.schedule).
- `schedule_tokens(schedule) <= len(tokens)`: the passes only ever fed tokens of the history.
- `kv_tokens` (the tokens the stored KV covers; 0 if none) is 0 or a prefix sum of `schedule` — the KV
  stops at a pass boundary — so `kv_tokens <= schedule_tokens(schedule)`; it equals that right after an
  offload, and is smaller when the history moved on after the KV was stored (replay covers the rest).
- Timestamps are finite numbers; `decode(m.encode()) == m` (timestamps come back as floats).
- `blocks` is empty or lists the sealed blocks then the tail (`tail` true) of a KV covering kv_tokens > 0.
- The meta carries a manifest record version `v`: only MANIFEST_VERSION is written or read (version 1, with
  no block records, was dropped before the first release); other versions are refused.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import numpy as np

from kvstore.codec.container import Codec, ContainerError, Kind, pack_container, unpack_container
from kvstore.schedule import SEAL, boundaries, check_schedule, entry_tokens, schedule_tokens

MANIFEST_VERSION = 2
_REF = 65  # bytes per block record: flags, key digest, content hash
ID_RE = re.compile(r"[A-Za-z0-9._-]{1,128}")
_U32_LIMIT = 1 << 32


def validate_id(value: object, what: str) -> str:
    """A tenant or session id: non-empty, at most 128 chars of [A-Za-z0-9._-]. Raises ValueError."""
    if not isinstance(value, str) or not ID_RE.fullmatch(value):
        raise ValueError(f"{what} must be 1..128 characters of [A-Za-z0-9._-], got {value!r}")
    return value


def _int_list(values: object, what: str, low: int) -> list[int]:
    if not isinstance(values, (list, tuple)):
        raise ContainerError(f"manifest {what} must be a list of ints, not {type(values).__name__}")
    for i, v in enumerate(values):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
            raise ContainerError(f"manifest {what}[{i}]={v!r} is not an int")
        if v < low:
            kind = "a non-positive pass length" if low == 1 else "out of range [0, 2^32)"
            raise ContainerError(f"manifest {what}[{i}]={v} is {kind}")
        if v >= _U32_LIMIT:
            raise ContainerError(f"manifest {what}[{i}]={v} is out of range (>= 2^32)")
    return [int(v) for v in values]


def _rle(values: list[int]) -> list[tuple[int, int]]:
    runs: list[list[int]] = []
    for v in values:
        if runs and runs[-1][0] == v and runs[-1][1] < _U32_LIMIT - 1:
            runs[-1][1] += 1
        else:
            runs.append([v, 1])
    return [(v, n) for v, n in runs]


@dataclass(frozen=True)
class BlockRef:
    """One stored block a session's KV uses: where it is (scope and key) and what it must hold."""

    key: bytes  # 32-byte key digest (a chain hash or a content key)
    content: bytes  # 32-byte content hash of the block's tensors
    public: bool = False  # stored in the public scope (shared across tenants)

    def pack(self) -> bytes:
        return bytes([1 if self.public else 0]) + self.key + self.content

    @classmethod
    def unpack(cls, b: bytes) -> BlockRef:
        if b[0] not in (0, 1):
            raise ContainerError(f"manifest block record has unknown flags {b[0]}")
        return cls(key=bytes(b[1:33]), content=bytes(b[33:65]), public=b[0] == 1)


@dataclass
class SessionManifest:
    tenant: str
    session_id: str
    tokens: list[int]  # the whole token history (the durable truth)
    schedule: list[int]  # the forward passes that built the KV, in order (kvstore.schedule entries)
    kv_tokens: int  # how many leading tokens the stored KV covers (0 if none)
    model_fingerprint: str
    quant_spec: str
    created_at: float  # unix seconds
    updated_at: float
    pinned: bool = False  # kept on the device: never offloaded for idleness (PinSession)
    blocks: list[BlockRef] = field(default_factory=list)  # the stored KV: sealed blocks in order, then the tail

    def validate(self) -> None:
        """Check every invariant of the module docstring; raises ContainerError naming the first violation."""
        try:
            validate_id(self.tenant, "tenant")
            validate_id(self.session_id, "session id")
        except ValueError as e:
            raise ContainerError(f"manifest {e}") from None
        tokens = _int_list(self.tokens, "tokens", 0)
        schedule = _int_list(self.schedule, "schedule", SEAL)
        try:
            check_schedule(schedule)
        except ValueError as e:
            raise ContainerError(f"manifest {e}") from None
        for name in ("model_fingerprint", "quant_spec"):
            if not isinstance(getattr(self, name), str):
                raise ContainerError(f"manifest {name} must be a str, not {type(getattr(self, name)).__name__}")
        for name in ("created_at", "updated_at"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise ContainerError(f"manifest {name}={v!r} must be a finite number")
        total = schedule_tokens(schedule)
        if total > len(tokens):
            raise ContainerError(f"manifest schedule covers {total} tokens, the history has only {len(tokens)}")
        kv = self.kv_tokens
        if isinstance(kv, bool) or not isinstance(kv, int) or kv < 0:
            raise ContainerError(f"manifest kv_tokens={kv!r} must be an int >= 0")
        if kv != 0 and kv not in set(boundaries(schedule)[1:]):
            raise ContainerError(f"manifest kv_tokens={kv} is not a boundary of the schedule (which covers {total})")
        if self.blocks and kv == 0:
            raise ContainerError("manifest lists stored blocks but kv_tokens is 0")
        for i, r in enumerate(self.blocks):
            if not (isinstance(r, BlockRef) and len(r.key) == 32 and len(r.content) == 32):
                raise ContainerError(f"manifest block record {i} is malformed")

    def encode(self) -> bytes:
        """The manifest container. Raises ContainerError (a ValueError) if an invariant does not hold."""
        self.validate()
        tokens = np.asarray(self.tokens, dtype=np.int64).astype("<u4")
        runs = _rle([int(v) for v in self.schedule])
        run_arr = np.asarray(runs, dtype=np.int64).reshape(-1, 2).astype("<u4")
        meta = {
            "v": MANIFEST_VERSION, "tenant": self.tenant, "session_id": self.session_id,
            "model_fingerprint": self.model_fingerprint, "quant_spec": self.quant_spec,
            "created_at": float(self.created_at), "updated_at": float(self.updated_at),
            "kv_tokens": int(self.kv_tokens), "n_tokens": int(tokens.size), "n_runs": len(runs),
            "n_blocks": len(self.blocks),
        }
        if self.pinned:
            meta["pinned"] = True  # optional key: absent in older manifests means False
        refs = b"".join(r.pack() for r in self.blocks)
        return pack_container(Kind.MANIFEST, Codec.RAW, meta, tokens.tobytes() + run_arr.tobytes() + refs)

    @classmethod
    def decode(cls, data: bytes) -> SessionManifest:
        """Open and validate a manifest container; raises ContainerError on any problem."""
        _, codec, meta, payload = unpack_container(data, expect_kind=Kind.MANIFEST)
        if codec != Codec.RAW:
            raise ContainerError(f"manifest codec must be RAW, got {codec.name}")
        types = {"v": int, "tenant": str, "session_id": str, "model_fingerprint": str, "quant_spec": str,
                 "created_at": (int, float), "updated_at": (int, float), "kv_tokens": int, "n_tokens": int,
                 "n_runs": int, "n_blocks": int}
        for key, typ in types.items():
            if key not in meta:
                raise ContainerError(f"manifest header is missing or has a bad field: no {key!r}")
            if isinstance(meta[key], bool) or not isinstance(meta[key], typ):
                raise ContainerError(f"manifest header is missing or has a bad field: {key!r} is a "
                                     f"{type(meta[key]).__name__}")
        if meta["v"] != MANIFEST_VERSION:
            raise ContainerError(f"unsupported manifest version {meta['v']} (this build reads {MANIFEST_VERSION})")
        n_tokens, n_runs, n_blocks = meta["n_tokens"], meta["n_runs"], meta["n_blocks"]
        if n_tokens < 0 or n_runs < 0 or n_blocks < 0 or len(payload) != 4 * n_tokens + 8 * n_runs + _REF * n_blocks:
            raise ContainerError(f"manifest payload size {len(payload)} does not match its header "
                                 f"(4*{n_tokens} token bytes + 8*{n_runs} schedule-run bytes + "
                                 f"{_REF}*{n_blocks} block records)")
        tokens = np.frombuffer(payload, dtype="<u4", count=n_tokens).tolist()
        runs = np.frombuffer(payload, dtype="<u4", count=2 * n_runs, offset=4 * n_tokens).reshape(-1, 2).tolist()
        # Bound the run-length expansion before materializing it: every pass feeds >= 1 token.
        seals = sum(n for v, n in runs if v == SEAL)
        if any(n == 0 for _, n in runs) or sum(entry_tokens(v) * n for v, n in runs) > n_tokens or seals > max(1, n_tokens):
            raise ContainerError(f"manifest schedule is inconsistent with its history of {n_tokens} tokens")
        schedule = [v for v, n in runs for _ in range(n)]
        at = 4 * n_tokens + 8 * n_runs
        blocks = [BlockRef.unpack(payload[at + _REF * i: at + _REF * (i + 1)]) for i in range(n_blocks)]
        m = cls(tenant=meta["tenant"], session_id=meta["session_id"], tokens=tokens, schedule=schedule,
                kv_tokens=meta["kv_tokens"], model_fingerprint=meta["model_fingerprint"],
                quant_spec=meta["quant_spec"], created_at=float(meta["created_at"]),
                updated_at=float(meta["updated_at"]), pinned=meta.get("pinned", False) is True, blocks=blocks)
        m.validate()
        return m
