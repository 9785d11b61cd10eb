"""The recent window of one side (keys or values) of a `QuantizedKVLayer`: model-dtype floats or INT8 codes.

A window holds the newest tokens of a layer, [B, H, n, D], until they are sealed into groups. Two kinds,
chosen by `QuantConfig.window_bits`:

- `FloatWindow` (w16, the default): the tensors as the model produced them, in the model dtype.
  Exported as `<side>_win`.
- `Int8Window` (w8): per token and head, symmetric absmax INT8: `codes` int8 [B, H, n, D] in [-127, 127]
  and `scale` fp16 [B, H, n, 1]; the value read is `codes * scale` (computed in float32, then cast to the
  model dtype). Exported as `<side>_win` (the int8 codes) and `<side>_win_scale`.

Invariants:
- A token's window entry is a function of that token's own K/V row alone (per-token scales): it is
  quantized once, when appended, and never again, so the state does not depend on how tokens were chunked.
- Slicing, selecting and concatenating act on the stored form (codes and scales), never re-quantize.
- Sealing reads what the window holds (`read` of its first entries): with w8, sealed groups are quantized
  from the dequantized INT8 values in the model dtype (the exact values attention saw), so the KV stays a
  function of tokens and schedule.
- `tensors(side)` / `from_tensors(side, t, dtype)` round-trip bit for bit.
- `cat` is lazy: the appended windows are kept as parts and joined into one tensor when the entries are
  first read (`x`, `codes`, `scale` and everything built on them). A decoding layer appends one token per
  side and step and reads its window only when a group seals (its attention reads the decode view), so
  one copy per seal replaces one per step, and at most `JOIN_EVERY` parts wait (a part is a few Python
  objects that the garbage collector walks while they live: unbounded, a long answer's window would hold one
  per token). Joining is a copy: the bits are those of step-by-step concatenation. Windows are values:
  `a.cat(b)` changes neither `a`'s entries nor `b`.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from kvstore.quant import int8_rows
from kvstore.quant.quantize import FP16_MAX
from kvstore.quant.rotation import hadamard_rows

INT8_LEVELS = int8_rows.LEVELS  # symmetric: codes in [-127, 127]
JOIN_EVERY = 16  # appended parts a window keeps unjoined at most (module docstring)


class _Window:
    """What both kinds share: entries held as tensors [B, H, n, *] that grow along dim -2, and the lazy `cat`
    (module docstring). Subclasses name the tensors and say how rows are quantized and read."""

    SUFFIXES: tuple[str, ...]  # the stored tensors, in order, are exported as `<side>_win<suffix>`
    bits: int

    def __init__(self, *tensors: torch.Tensor, later: tuple = (), n: int | None = None):
        # entries: tensors, then each window of `later` (joined when first read). One attribute holds both,
        # replaced in one store, so a join is atomic: a reader on another thread (a size query) sees the parts
        # before or after it, never the joined tensors with the parts still pending (which it would append again).
        self._parts = (tensors, later)
        self._n = tensors[0].shape[-2] if n is None else n

    @classmethod
    def _made(cls, parts: tuple, n: int):
        """A window of `parts` (as `_parts`) holding `n` entries, without `__init__`'s checks: the hot paths
        (`cat`, once per token and side) make thousands a pass."""
        w = object.__new__(cls)
        w._parts, w._n = parts, n
        return w

    def _joined(self) -> tuple[torch.Tensor, ...]:
        tensors, later = self._parts
        if later:
            rest = [w._joined() for w in later]
            tensors = tuple(torch.cat([t, *(r[i] for r in rest)], dim=-2) for i, t in enumerate(tensors))
            self._parts = (tensors, ())
        return tensors

    def __len__(self) -> int:
        return self._n

    @property
    def shape(self) -> torch.Size:
        return self._joined()[0].shape

    @property
    def device(self) -> torch.device:
        return self._parts[0][0].device

    def cat(self, other):
        if len(self._parts[1]) >= JOIN_EVERY:
            self._joined()
        tensors, later = self._parts
        return self._made((tensors, (*later, other)), self._n + other._n)

    @classmethod
    def entries_and_readings(cls, x: torch.Tensor, dtype: torch.dtype, rotated: tuple[bool, ...]
                             ) -> tuple[_Window, torch.Tensor]:
        """The window entries of `x` [S, ..., D] (S sides stacked) and their readings in `dtype`, side s rotated
        row by row where `rotated[s]`: `quantize`, `read`, `hadamard_rows`."""
        w = cls.quantize(x)
        reads = w.read(dtype)
        if any(rotated):
            reads = torch.stack([hadamard_rows(r) if turn else r for r, turn in zip(reads, rotated, strict=True)])
        return w, reads

    def slice(self, start: int, stop: int | None = None):
        """Entries [start, stop) as a window with storage of its own (the old storage is not kept alive)."""
        return type(self)(*(t[..., start:stop, :].clone() for t in self._joined()))

    def select(self, idx: torch.Tensor):
        return type(self)(*(t.index_select(-2, idx) for t in self._joined()))

    def tensors(self, side: str) -> dict[str, torch.Tensor]:
        return {f"{side}_win{suffix}": t for suffix, t in zip(self.SUFFIXES, self._joined())}

    @classmethod
    def from_tensors(cls, side: str, t: dict[str, torch.Tensor]):
        return cls(*(t[f"{side}_win{suffix}"] for suffix in cls.SUFFIXES))


class BatchRow:
    """Row `row` of a window of a batch ([R, H, n, *]) as a part of another window's lazy `cat`: it holds the
    batch and takes the row's views only when that window joins. A batched pass appends one row to each of
    its sessions' windows per layer and side; making a window object and a view per tensor for each of them
    at once took ~9% of a 16-row pass. Reading a part gives what a window of the row's views would:
    `_joined()` is the same tensors, so joining gives the same bits."""

    __slots__ = ("batch", "row", "_n")

    def __init__(self, batch: _Window, row: int):
        self.batch, self.row, self._n = batch, row, batch._n

    def __len__(self) -> int:
        return self._n

    def _joined(self) -> tuple[torch.Tensor, ...]:
        r = self.row
        return tuple(t[r:r + 1] for t in self.batch._joined())


class FloatWindow(_Window):
    """A side's window held as is, in the model dtype (w16)."""

    SUFFIXES, bits = ("",), 16  # x

    @property
    def x(self) -> torch.Tensor:
        return self._joined()[0]

    @classmethod
    def quantize(cls, x: torch.Tensor) -> FloatWindow:
        return cls(x)

    def read(self, dtype: torch.dtype, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Entries [start, stop) (default: to the end) as [B, H, stop - start, D] in `dtype` (a token's
        reading is its own: elementwise)."""
        return self.x[..., start:stop, :].to(dtype)


class Int8Window(_Window):
    """A side's window held as INT8 codes with an fp16 absmax scale per token and head (w8)."""

    SUFFIXES, bits = ("", "_scale"), 8  # codes, scale

    @property
    def codes(self) -> torch.Tensor:
        return self._joined()[0]

    @property
    def scale(self) -> torch.Tensor:
        return self._joined()[1]

    @classmethod
    def quantize(cls, x: torch.Tensor) -> Int8Window:
        """Quantize [B, H, q, D] rows: scale = absmax / 127 rounded up to fp16, codes = round(x / scale).

        The scale is rounded up so |x| / scale <= 127 and no code clips (values past the fp16 range are
        clamped to it first); an all-zero row has scale 0 and codes 0."""
        xf = x.float()
        amax = xf.abs().amax(-1, keepdim=True).clamp_(max=FP16_MAX)
        scale = (amax / INT8_LEVELS).half()
        short = scale.float() * INT8_LEVELS < amax
        # the next fp16 up where the rounded scale fell short: +1 on the bits of a non-negative finite half
        scale = (scale.view(torch.int16) + short).view(torch.float16)
        s = scale.float()
        pos = s > 0
        codes = torch.where(pos, xf / torch.where(pos, s, 1.0), 0.0)
        codes = codes.round_().clamp_(-INT8_LEVELS, INT8_LEVELS).to(torch.int8)
        return cls(codes.contiguous(), scale.contiguous())

    @classmethod
    def entries_and_readings(cls, x: torch.Tensor, dtype: torch.dtype, rotated: tuple[bool, ...]
                             ) -> tuple[Int8Window, torch.Tensor]:
        """`_Window.entries_and_readings`, in one numba call where it gives the same bits (kvstore/quant/int8_rows.py)."""
        got = int8_rows.entries_and_readings(x, dtype, rotated)
        if got is None:
            return super().entries_and_readings(x, dtype, rotated)
        codes, scale, reads = got
        return cls._made(((codes, scale), ()), codes.shape[-2]), reads

    def read(self, dtype: torch.dtype, start: int = 0, stop: int | None = None) -> torch.Tensor:
        codes, scale = self._joined()
        return (codes[..., start:stop, :].float() * scale[..., start:stop, :].float()).to(dtype)

    @classmethod
    def from_tensors(cls, side: str, t: dict[str, torch.Tensor]) -> Int8Window:
        codes, scale = t[f"{side}_win"], t[f"{side}_win_scale"]
        if codes.dtype != torch.int8 or scale.dtype != torch.float16 or scale.shape != (*codes.shape[:-1], 1):
            raise ValueError(f"INT8 window {side}: codes {codes.dtype}{list(codes.shape)} and scale "
                             f"{scale.dtype}{list(scale.shape)} do not fit (int8 [B, H, n, D], fp16 [B, H, n, 1])")
        return cls(codes, scale)


Window = FloatWindow | Int8Window
WINDOW_KINDS: dict[int, type[FloatWindow] | type[Int8Window]] = {16: FloatWindow, 8: Int8Window}
WINDOW_FIELDS = ("k_win", "v_win", "k_win_scale", "v_win_scale")  # every name a window tensor may have


def window_kind(bits: int) -> type[FloatWindow] | type[Int8Window]:
    """The window class for `QuantConfig.window_bits`."""
    return WINDOW_KINDS[bits]


class NewRows(NamedTuple):
    """A pass's new tokens for one layer, in window form, with their reading (what `read` gives for them).

    Window entries and their readings are per token, so a batched pass computes them for all its rows at
    once and hands each row its slice (`rows`): the bits are those the layer would compute for the row alone."""

    keys: Window | BatchRow
    values: Window | BatchRow
    reads: torch.Tensor  # [2, R, H, q, D]: the keys' readings, then the values'

    @property
    def k_read(self) -> torch.Tensor:
        return self.reads[0]

    @property
    def v_read(self) -> torch.Tensor:
        return self.reads[1]

    @classmethod
    def of(cls, kind: type[FloatWindow] | type[Int8Window], key: torch.Tensor, value: torch.Tensor,
           dtype: torch.dtype, rotated: tuple[bool, bool] = (False, False)) -> NewRows:
        """Entries of `key`/`value` [R, H, q, D]; readings rotated row by row for the sides in `rotated`.

        Both sides are quantized and read in one call, stacked ([2, R, H, q, D]): every entry and reading is a
        function of its own token and head, so the bits are those of two calls."""
        both, reads = kind.entries_and_readings(torch.stack((key, value)), dtype, rotated)
        k, v = (kind._made((tuple(t[i] for t in both._joined()), ()), len(both)) for i in (0, 1))
        return cls(k, v, reads)

    def row(self, r: int) -> NewRows:
        """Batch row r's entries (`BatchRow` parts) and readings ([2, 1, H, q, D], a view) alone."""
        return NewRows(BatchRow(self.keys, r), BatchRow(self.values, r), self.reads[:, r:r + 1])
