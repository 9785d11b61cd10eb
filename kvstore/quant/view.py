"""`DecodeView`: a layer's held K/V as attention reads them, dequantized, in one growing buffer (keys and values stacked).

A session that decodes reads its whole history every step. Dequantizing the sealed region again, reading
the window again and concatenating the two would cost a copy of the history per layer and step; the view
keeps rows [0, n) of what attention receives ([sinks | sealed | window], in held order) in a buffer with
spare capacity, so a step writes only its new rows and hands attention `read()`, a narrowed view of it.

Invariants (the layer, kvstore/quant/layer.py, maintains them):
- Rows [0, n) equal, bit for bit, what a full read of the layer's state gives for those rows. A row is
  written from values computed elementwise from the state (dequantization), so writing rows one by one
  or all at once gives the same bits.
- `write(start, ...)` overwrites rows from `start <= n` (sealing replaces window rows by their sealed
  reading) and extends n past them when they reach beyond; `truncate(m)` forgets rows from m on.
- Growing copies the rows into a larger buffer; the values read are unchanged.
- A row `reserve` takes is written in place by the pass that reserved it, before anything reads the view
  (the only exception to the first invariant, inside one layer of one batched pass).
- The view is scratch: never exported, counted in the layer's `device_bytes` while it exists. Its buffers
  are inference tensors, written in inference mode, so a view built during a forward pass can be written
  by sealing outside one (adopting a prefix seals the whole window between passes).
"""

from __future__ import annotations

import torch

SPARE_MIN = 64  # rows of spare capacity at least, when the buffer grows


class DecodeView:
    """Rows [0, n) of a layer's keys and values as attention receives them: one buffer [2, B, H, capacity, D],
    keys at index 0 and values at 1, so a step writes and reads both sides with one op each."""

    def __init__(self, k: torch.Tensor, v: torch.Tensor):
        self.kv = None
        self.n = 0
        self._grow(k, k.shape[-2])
        self.write(0, k, v)

    @torch.inference_mode()
    def _grow(self, like: torch.Tensor, need: int) -> None:
        cap = need + max(SPARE_MIN, need // 8)
        kv = like.new_empty((2, *like.shape[-4:-2], cap, like.shape[-1]))
        if self.n:
            kv[..., :self.n, :] = self.kv[..., :self.n, :]
        self.kv = kv

    def write(self, start: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Rows [start, start + len) := k, v; n grows to cover them. Needs start <= n."""
        self._write(start, k, v)

    def write_both(self, start: int, kv: torch.Tensor) -> None:
        """`write(start, kv[0], kv[1])` for keys and values stacked [2, B, H, q, D], in one copy."""
        self._write(start, kv)

    def _write(self, start: int, *sides: torch.Tensor) -> None:
        """`sides`: keys and values, or both stacked (one tensor)."""
        if not torch.is_inference_mode_enabled():  # (a pass's writes are; entering the mode per write costs)
            with torch.inference_mode():
                return self._write(start, *sides)
        if start > self.n:
            raise ValueError(f"a decode view of {self.n} rows cannot take rows from {start}")
        stop = start + sides[0].shape[-2]
        if stop > self.kv.shape[-2]:
            self._grow(sides[0], stop)
        rows = self.kv.narrow(-2, start, stop - start)
        if len(sides) == 1:
            rows.copy_(sides[0])
        else:
            rows[0].copy_(sides[0])
            rows[1].copy_(sides[1])
        self.n = max(self.n, stop)

    def append(self, kv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`write_both(n, kv)` then `read()`: a decode step's new rows (stacked), and every row for attention."""
        self.write_both(self.n, kv)
        return self.read()

    def room(self) -> bool:
        """Whether row n fits the buffer without growing it."""
        return self.n < self.kv.shape[-2]

    def make_room(self) -> None:
        """Grow the buffer so that row n fits (rows [0, n) are copied: none may be waiting for a write)."""
        if not self.room():
            self._grow(self.kv, self.n + 1)

    def reserve(self) -> int:
        """Take row n for a reading written in place later, before anything reads it (`RowAttention`, a batched
        pass's attention, writes each row's readings, then attends); needs `room()`. Returns the new n."""
        if not self.room():
            raise ValueError(f"a decode view of {self.n} rows has no room to reserve one")
        self.n += 1
        return self.n

    def truncate(self, m: int) -> None:
        """Forget rows from `m` on (they no longer hold what attention would read)."""
        self.n = min(self.n, m)

    def read(self, m: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows [0, m) (default: all n) of keys and values, views into the buffer."""
        return self.kv.narrow(-2, 0, self.n if m is None else m).unbind(0)

    def nbytes(self) -> int:
        return self.kv.untyped_storage().nbytes()
