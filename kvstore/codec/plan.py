"""The plan of a KV block's coding (`kvstore.codec.entropy`): which tensors form which code streams, a
pure function of the block's layout (names, dtypes, shapes) and code bit widths, the same on both sides.

Code streams: `*_codes` tensors [*lead, T, m] uint8 (m % bits == 0, or bits == 8: n = 8m / bits codes per
token, padding codes included), grouped by (field, bits, shape, scale/zero shape). A layer's fp16
`*_scale`/`*_zero` pair joins its codes' stream when its shape fits the KIVI layout (keys [*lead, G, D]
with T % G == 0 and D <= n; values [*lead, T, G] with n % G == 0). Every other tensor is "generic".

Invariants: `plan_of` validates the layout (names unique, dtypes supported, shapes non-negative, at most
MAX_BLOCK_BYTES of data, a valid bit width for every code tensor) and raises ContainerError otherwise.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field

import numpy as np

from kvstore.codec import ans
from kvstore.codec.container import ContainerError
from kvstore.codec.tensors import DTYPE_CODES

MAX_BLOCK_BYTES = 1 << 31  # refuse layouts over 2 GiB of raw tensor data


def block_error(msg: str) -> ContainerError:
    """The ContainerError of a KV block that does not decode or encode, saying why."""
    return ContainerError(f"KV block: {msg}")


Layout = list[tuple[str, np.dtype, tuple[int, ...]]]


@dataclass
class Stream:
    """Code tensors of one (field, bits, shape) coded together; rows = channels over the block's T tokens."""

    bits: int
    shape: tuple  # of each member's codes [*lead, T, m]
    mshape: tuple | None  # of each member's scale and zero, when they are coded with the codes
    kind: str  # "k" (scale/zero [*lead, G, D]), "v" ([*lead, T, G]) or "" (no scale/zero)
    n: int  # codes per token
    gv: int  # codes per value group (n without scale/zero or for keys)
    codes: list[int] = field(default_factory=list)  # layout indices of the members' codes
    metas: list[tuple[int, int]] = field(default_factory=list)  # (scale, zero) layout indices per member

    @functools.cached_property
    def neighbours(self) -> np.ndarray:  # ans.neighbours of the stream's scale/zero elements (kept with the plan)
        ms = self.mshape
        return ans.neighbours(self.kind == "k", len(self.metas) * math.prod(ms[:-2]), ms[-2], ms[-1], self.heads)

    t = property(lambda self: self.shape[-2])  # tokens: the rows' length
    m = property(lambda self: self.shape[-1])  # packed bytes per token
    heads = property(lambda self: self.shape[-3] if len(self.shape) > 2 else 1)  # rows of a layer-batch
    rows = property(lambda self: len(self.codes) * math.prod(self.shape[:-2]))
    nsym = property(lambda self: self.rows * self.n * self.t)
    nmeta = property(lambda self: len(self.metas) * math.prod(self.mshape) if self.kind else 0)

    @property
    def modes(self) -> list[int]:  # context modes that fit (ans.row_classes: keys, ans.tok_classes: values)
        keys_ok = self.kind != "v" and self.n >= 8 and self.n % 2 == 0
        values_ok = self.kind != "k" and self.n % ans.NL == 0 and self.gv % ans.NL == 0 and self.gv >= 2 * ans.NL
        return [0] + [1] * keys_ok + [2] * values_ok


@dataclass
class Plan:
    layout: Layout
    streams: list[Stream]
    generic: list[int]  # layout indices of the tensors coded by zstd


def plan_of(layout, bits) -> Plan:
    """Validated layout -> plan; cached, since a session's blocks share one layout."""
    if not isinstance(bits, dict):
        raise block_error(f"bits must be a dict, not {type(bits).__name__}")
    try:
        key = (tuple(layout), tuple(bits.items()))
        hash(key)
    except TypeError:  # unhashable (e.g. list shapes): plan without the cache
        return _make_plan(layout, bits)
    return _cached(key)


@functools.lru_cache(maxsize=16)
def _cached(key: tuple) -> Plan:
    return _make_plan(*key)


def _make_plan(layout, bits) -> Plan:
    try:
        bits = dict(bits)
        key = [(name, np.dtype(dt), tuple(int(d) for d in shape),
                bits.get(name) if isinstance(name, str) and name.endswith("_codes") else None)
               for name, dt, shape in layout]
    except (TypeError, ValueError) as e:
        raise block_error(f"invalid layout: {e}") from None
    total, names = 0, set()
    for name, dt, shape, b in key:
        if not isinstance(name, str) or name in names or min(shape, default=0) < 0 or dt.name not in DTYPE_CODES:
            raise block_error(f"invalid layout entry {name!r} {dt} {shape}")
        names.add(name)
        total += math.prod(shape) * dt.itemsize
        if name.endswith("_codes") and dt == np.uint8 and (isinstance(b, bool) or not isinstance(b, int)
                                                           or not 1 <= b <= 8):
            raise block_error(f"no valid code bit width for {name!r} (got {b!r}; need an int in 1..8)")
    if total > MAX_BLOCK_BYTES:
        raise block_error(f"layout holds {total} bytes, over the {MAX_BLOCK_BYTES}-byte limit")
    layout = [(name, dt, shape) for name, dt, shape, _ in key]
    bits = {name: b for name, _, _, b in key}
    index = {name: i for i, (name, _, _) in enumerate(layout)}
    streams: dict[tuple, Stream] = {}
    taken: set[int] = set()
    for i, (name, dt, shape) in enumerate(layout):
        if not name.endswith("_codes") or dt != np.uint8 or len(shape) < 2 or 0 in shape:
            continue
        b, (t, m) = bits[name], shape[-2:]
        if b < 8 and m % b:
            continue
        n = m if b == 8 else m * 8 // b
        prefix = name[: -len("codes")]  # "{l}.k_"
        side = prefix.rsplit(".", 1)[-1][:-1]
        pair = (index.get(prefix + "scale"), index.get(prefix + "zero"))
        kind, ms = "", None
        if None not in pair and all(layout[j][1] == np.float16 and layout[j][1].byteorder in "=<" for j in pair):
            ms = layout[pair[0]][2]
            if ms == layout[pair[1]][2] and len(ms) == len(shape) and ms[:-2] == shape[:-2] and 0 not in ms:
                if side == "k" and t % ms[-2] == 0 and ms[-1] <= n:
                    kind = "k"
                elif side == "v" and ms[-2] == t and n % ms[-1] == 0:
                    kind = "v"
        ms = ms if kind else None
        s = streams.setdefault((side, b, shape, kind, ms),
                               Stream(b, shape, ms, kind, n, n // ms[-1] if kind == "v" else n))
        s.codes.append(i)
        taken.add(i)
        if kind:
            s.metas.append(pair)
            taken.update(pair)
    return Plan(layout, list(streams.values()), [i for i in range(len(layout)) if i not in taken])
