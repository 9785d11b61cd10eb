"""The offload policy (which sessions leave the device) and the restore-or-recompute cost model.

`OffloadPolicy.victims` picks, among sessions that are neither busy nor pinned: every session idle for
`idle_timeout_s`, then least-recently-used ones until the device holds at most `device_budget_bytes`
(0: no budget). `RestoreCost` keeps exponentially weighted averages of measured costs — seconds per block
fetched and decoded, seconds per token prefilled — and decides, per block, whether restoring (fetch and
decode) beats recomputing. Both are pure policy: they never touch the cache or storage themselves.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Resident:
    """What the policy needs to know of a session on the device."""

    key: tuple[str, str]
    last_used: float
    nbytes: int
    busy: bool = False
    pinned: bool = False


@dataclass(frozen=True)
class OffloadPolicy:
    idle_timeout_s: float
    device_budget_bytes: int = 0

    def victims(self, sessions: list[Resident], now: float) -> list[tuple[str, str]]:
        movable = sorted((s for s in sessions if not s.busy and not s.pinned), key=lambda s: s.last_used)
        out = [s.key for s in movable if now - s.last_used >= self.idle_timeout_s]
        if self.device_budget_bytes > 0:
            total = sum(s.nbytes for s in sessions) - sum(s.nbytes for s in movable if s.key in out)
            for s in movable:
                if total <= self.device_budget_bytes:
                    break
                if s.key not in out:
                    out.append(s.key)
                    total -= s.nbytes
        return out


class RestoreCost:
    """Measured cost of restoring a stored block (fetch and decode) versus prefilling its tokens (EWMA, starting from priors)."""

    def __init__(self, restore_s_per_block: float = 0.002, prefill_s_per_token: float = 0.002, alpha: float = 0.2):
        self.restore_s_per_block, self.prefill_s_per_token, self.alpha = restore_s_per_block, prefill_s_per_token, alpha

    def _mix(self, old: float, new: float) -> float:
        return (1 - self.alpha) * old + self.alpha * new

    def observe_restore(self, blocks: int, seconds: float) -> None:
        if blocks > 0 and seconds >= 0:
            self.restore_s_per_block = self._mix(self.restore_s_per_block, seconds / blocks)

    def observe_prefill(self, tokens: int, seconds: float) -> None:
        if tokens > 0 and seconds >= 0:
            self.prefill_s_per_token = self._mix(self.prefill_s_per_token, seconds / tokens)

    def restore_pays(self, blocks: int, tokens: int) -> bool:
        """True when fetching and decoding `blocks` is expected to be cheaper than prefilling `tokens`."""
        return blocks * self.restore_s_per_block < tokens * self.prefill_s_per_token
