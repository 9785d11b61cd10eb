"""`HostTier`: a worker's warm tier — encoded KV blocks kept in host memory, least recently used out first.

It caches what the worker wrote to or read from Redis (keys are the Redis block keys), so resuming a
session on the worker that offloaded it needs no Redis round trip. It is a cache: Redis stays the
authority, so losing the host tier (a restart) costs time, never data.

Invariant: `nbytes` (the sum of held values' lengths) <= `budget_bytes` after every `put`; a budget of 0
holds nothing.
"""

from __future__ import annotations

from collections import OrderedDict


class HostTier:
    def __init__(self, budget_bytes: int):
        self.budget_bytes = int(budget_bytes)
        self._items: OrderedDict[str, bytes] = OrderedDict()
        self.nbytes = 0
        self.hits = self.misses = 0

    def __len__(self) -> int:
        return len(self._items)

    def get(self, key: str) -> bytes | None:
        value = self._items.get(key)
        if value is None:
            self.misses += 1
            return None
        self._items.move_to_end(key)
        self.hits += 1
        return value

    def put(self, key: str, value: bytes) -> None:
        if len(value) > self.budget_bytes:
            return
        old = self._items.pop(key, None)
        if old is not None:
            self.nbytes -= len(old)
        self._items[key] = value
        self.nbytes += len(value)
        while self.nbytes > self.budget_bytes:
            _, dropped = self._items.popitem(last=False)
            self.nbytes -= len(dropped)

    def discard(self, key: str) -> None:
        old = self._items.pop(key, None)
        if old is not None:
            self.nbytes -= len(old)
