"""`TokenRate`: per-tenant tokens per minute, enforced by the gateway (quota.max_tokens_per_minute).

Each finished call adds its prompt + generated tokens at its end time; a call may start while the tenant's
tokens in the last 60 s are below the limit, else RESOURCE_EXHAUSTED with a retry hint (when the oldest
counted call leaves the window). Counts are per gateway process; with several gateways each enforces the
limit on its own traffic.
"""

from __future__ import annotations

import collections
import time

from services.errors import ResourceExhausted

WINDOW_S = 60.0


class TokenRate:
    def __init__(self, limit: int, clock=time.monotonic):
        self.limit, self.clock = limit, clock
        self._used: dict[str, collections.deque] = {}

    def _window(self, tenant: str) -> collections.deque:
        q = self._used.setdefault(tenant, collections.deque())
        now = self.clock()
        while q and q[0][0] <= now - WINDOW_S:
            q.popleft()
        return q

    def check(self, tenant: str) -> None:
        if self.limit <= 0:
            return
        q = self._window(tenant)
        used = sum(n for _, n in q)
        if used >= self.limit:
            wait = max(0.0, q[0][0] + WINDOW_S - self.clock())
            raise ResourceExhausted(f"tenant used {used} tokens in the last minute, the limit is "
                                    f"quota.max_tokens_per_minute={self.limit}", retry_after_s=round(wait, 3))

    def add(self, tenant: str, tokens: int) -> None:
        if self.limit > 0 and tokens > 0:
            self._window(tenant).append((self.clock(), tokens))
