"""The typed vocabulary of `SessionStore` (kvstore/tiers/store.py): what it is built from, what its
operations return, and the events it reports.

Invariants:
- Everything crossing the store's boundary is one of these dataclasses (never a dict), so the worker and
  the tests read fields, not keys.
- The store reports what it measured through `StoreEvents` (a callable taking one event); it never imports a
  metrics library. Events carry numbers and short labels only, never tensors or tokens.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from kvstore.config import QuantConfig
from kvstore.prefix.blocks import ModelShape
from kvstore.quant.state import KVState
from kvstore.tiers.manifest import BlockRef


@dataclass(frozen=True)
class ModelIdentity:
    """The model whose KV is stored: its fingerprint (weights, config, dtype), KV layout and device kind.
    Blocks stored under one identity are never decoded for another (the containers check it)."""

    fingerprint: str
    shape: ModelShape
    quant: QuantConfig  # the on-device KV spec
    device_kind: str  # "cpu", "cuda", ...: kernels differ in their rounding, so it is part of the domain
    key_exps: np.ndarray | None = field(default=None, compare=False)  # cold key weight exponents [L, H, D]
    # int8 (kvstore.quant.key_weights), needed only by a cold spec with qk; a function of the weights


@dataclass(frozen=True)
class StoreSettings:
    """How the store cuts, names, codes and caches blocks (the worker fills it from its config).

    `block_tokens` is a multiple of the key group; `prefill_chunk` a multiple of `block_tokens`. `sharing`
    off means no chain names, no adoption and no trie (every block is content-keyed)."""

    block_tokens: int
    prefill_chunk: int
    sharing: bool = True
    salt_key: bytes = b""
    cold: QuantConfig | None = None  # lossy cold mode: the spec blocks are re-quantized to (tiers.cold_spec)
    codec_level: int = 3  # zstandard level of the tail
    host_bytes: int = 0  # warm host tier budget (0: off)
    trie_bytes: int = 0  # hot prefix trie budget (0: off)
    codec_threads: int = 0  # 0: one per core


# ---- results -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Saved:
    """What `SessionStore.save` committed: the session's block records (blocks, then the tail), the tokens
    the stored KV covers, the compare-and-set tag of the written manifest, and the session's Redis bytes
    (its record plus every block it lists)."""

    blocks: list[BlockRef]
    kv_tokens: int
    manifest_sha: str
    redis_bytes: int


MISSING, CORRUPT = "missing", "corrupt"


@dataclass(frozen=True)
class Restored:
    """What `SessionStore.restore` found: the stored state, bit-identical to the one saved, and the tier
    it came from ("host" or "redis"); or None and why (`MISSING`, `CORRUPT`)."""

    state: KVState | None
    tier: str = ""
    reason: str = ""


@dataclass(frozen=True)
class Adoption:
    """A stored canonical prefix a new session takes over: its state (all sealed) and the tokens it covers."""

    state: KVState
    tokens: int
    from_trie: int  # blocks found hot in the trie
    from_redis: int  # blocks fetched from Redis


@dataclass(frozen=True)
class Published:
    """A prefix shared with every tenant: how many tokens, and whether it was newly registered."""

    tokens: int
    registered: bool


# ---- events ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class BytesWritten:
    """An offload wrote `nbytes` of containers (blocks and tail) to Redis."""

    nbytes: int


@dataclass(frozen=True)
class CompressionMeasured:
    """Ratios of the last offload: fp16 KV / device format, device format / stored, fp16 / stored."""

    quantization: float
    codec: float
    total: float


@dataclass(frozen=True)
class StorageFailed:
    """A Redis operation failed and the store fell back (restore or prefill instead)."""

    op: str


@dataclass(frozen=True)
class RestoreDecided:
    """The cost model chose, for `blocks` stored blocks on `path` ("resume" or "prefix"), to restore
    ("load") or recompute them ("recompute")."""

    path: str
    decision: str
    blocks: int


StoreEvent = BytesWritten | CompressionMeasured | StorageFailed | RestoreDecided
StoreEvents = Callable[[StoreEvent], None]


def ignore_events(event: StoreEvent) -> None:
    """The default `StoreEvents`: nothing is recorded."""
