"""`SessionManifest`: a session's durable record — its token history, the truth the KV is a cache of.

Stored as a MANIFEST container: ids, fingerprint, quant spec and timestamps in the JSON meta; the
token ids (uint32) and the forward schedule (run-length pairs of uint32 (length, count)) in the payload.

Invariants (checked on encode and on decode):
- `sum(schedule) <= len(tokens)`: the schedule lists the forward passes that built the KV in order;
  the last sampled token is usually not fed yet.
- `kv_tokens` (tokens covered by the stored KV copy, 0 if none) is a prefix sum of `schedule`, so the
  KV beyond it can be rebuilt exactly by replaying the rest of the schedule.
- token ids are in [0, 2^32).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np

from kvstore.codec.container import Codec, ContainerError, Kind, pack_container, unpack_container

MANIFEST_VERSION = 1


@dataclass
class SessionManifest:
    tenant: str
    session_id: str
    tokens: list[int]
    schedule: list[int]
    kv_tokens: int
    model_fingerprint: str
    quant_spec: str
    created_at: float
    updated_at: float

    def validate(self) -> None:
        if any(n <= 0 for n in self.schedule):
            raise ContainerError("manifest schedule has a non-positive pass length")
        prefix = set(itertools.accumulate(self.schedule, initial=0))
        if sum(self.schedule) > len(self.tokens):
            raise ContainerError(f"manifest schedule covers {sum(self.schedule)} tokens, history has {len(self.tokens)}")
        if self.kv_tokens not in prefix:
            raise ContainerError(f"manifest kv_tokens={self.kv_tokens} is not a boundary of the schedule")
        if self.tokens and not (0 <= min(self.tokens) and max(self.tokens) < 1 << 32):
            raise ContainerError("manifest token id out of range")

    def encode(self) -> bytes:
        self.validate()
        runs = [(n, len(list(g))) for n, g in itertools.groupby(self.schedule)]
        payload = np.asarray(self.tokens, dtype="<u4").tobytes() + np.asarray(runs, dtype="<u4").reshape(-1).tobytes()
        meta = {"v": MANIFEST_VERSION, "tenant": self.tenant, "session_id": self.session_id,
                "n_tokens": len(self.tokens), "n_runs": len(runs), "kv_tokens": self.kv_tokens,
                "model_fingerprint": self.model_fingerprint, "quant_spec": self.quant_spec,
                "created_at": self.created_at, "updated_at": self.updated_at}
        return pack_container(Kind.MANIFEST, Codec.RAW, meta, payload)

    @classmethod
    def decode(cls, data: bytes) -> "SessionManifest":
        _, codec, meta, payload = unpack_container(data, expect_kind=Kind.MANIFEST)
        try:
            if meta["v"] != MANIFEST_VERSION:
                raise ContainerError(f"unsupported manifest version {meta['v']}")
            n_tokens, n_runs = int(meta["n_tokens"]), int(meta["n_runs"])
            if codec != Codec.RAW or n_tokens < 0 or n_runs < 0 or len(payload) != 4 * (n_tokens + 2 * n_runs):
                raise ContainerError("manifest payload size does not match its header")
            tokens = np.frombuffer(payload, dtype="<u4", count=n_tokens).tolist()
            runs = np.frombuffer(payload, dtype="<u4", offset=4 * n_tokens).reshape(-1, 2).tolist()
            if any(n == 0 or count == 0 for n, count in runs) or sum(n * c for n, c in runs) > n_tokens:
                raise ContainerError("manifest schedule is inconsistent with its history")
            m = cls(tenant=str(meta["tenant"]), session_id=str(meta["session_id"]), tokens=tokens,
                    schedule=[n for n, count in runs for _ in range(count)], kv_tokens=int(meta["kv_tokens"]),
                    model_fingerprint=str(meta["model_fingerprint"]), quant_spec=str(meta["quant_spec"]),
                    created_at=float(meta["created_at"]), updated_at=float(meta["updated_at"]))
        except (KeyError, TypeError, ValueError) as e:
            if isinstance(e, ContainerError):
                raise
            raise ContainerError(f"manifest header is missing or has a bad field: {e}") from None
        m.validate()
        return m
