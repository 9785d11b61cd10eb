"""The library's entry point for storing sessions (what a worker imports, with kvstore.config,
kvstore.schedule and kvstore.device).

Re-exports, one name each, of:
- `SessionStore` (kvstore/tiers/store.py), the storage engine: save / restore / adopt / delete a session's
  KV, with its settings, identity, results and events (kvstore/tiers/store_types.py);
- `RedisTier`, `StaleManifest` (kvstore/tiers/redis_tier.py): the durable tier and its optimistic-write
  refusal; `SessionManifest`, `BlockRef` (kvstore/tiers/manifest.py): a session's durable record;
- `HistoryJournal` (kvstore/tiers/journal.py): the worker's local copy of manifests;
- `OffloadPolicy`, `Resident` (kvstore/tiers/policy.py): which sessions leave the device;
- `LayoutMigration`, `MigrationReport` (kvstore/tiers/legacy_layout.py): moving keys of the old layout;
- `ContainerError` (kvstore/codec/container.py): stored bytes that are not what they claim.
Nothing is defined here; the invariants are the modules'.
"""

from __future__ import annotations

from kvstore.codec.container import ContainerError
from kvstore.tiers.journal import HistoryJournal
from kvstore.tiers.legacy_layout import LayoutMigration, MigrationReport
from kvstore.tiers.manifest import BlockRef, SessionManifest
from kvstore.tiers.policy import OffloadPolicy, Resident
from kvstore.tiers.redis_tier import RedisTier, StaleManifest
from kvstore.tiers.store import SessionStore
from kvstore.tiers.store_types import (
    MISSING,
    BytesWritten,
    CompressionMeasured,
    ModelIdentity,
    Published,
    RestoreDecided,
    StorageFailed,
    StoreEvent,
    StoreSettings,
)

__all__ = ["MISSING", "BlockRef", "BytesWritten", "CompressionMeasured", "ContainerError", "HistoryJournal",
           "LayoutMigration", "MigrationReport", "ModelIdentity", "OffloadPolicy", "Published", "RedisTier",
           "Resident", "RestoreDecided", "SessionManifest", "SessionStore", "StaleManifest", "StorageFailed",
           "StoreEvent", "StoreSettings"]
