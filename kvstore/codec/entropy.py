"""Lossless coder of one sealed KV block (B tokens of every layer): rANS with previous-token contexts.

`encode_block(tensors, bits)` / `decode_block(payload, layout, bits)`: the block's named arrays in layout
order (`{l}.k_codes`, `{l}.k_scale`, ...), and the code bit width of every `*_codes` tensor. The caller
knows the layout (names, dtypes, shapes) from the quant spec and model shape, so the payload carries
neither names nor shapes, and one block decodes without any other block, dictionary or table.

Plan (`kvstore.codec.plan`, a pure function of layout and bits, the same on both sides):
- code streams: `*_codes` tensors grouped by (field, bits, shape, scale/zero shape). Codes are
  unpacked channel-major (a row = one channel over the T tokens, the stream's layers end to end) and
  rANS-coded with one frequency table per context: the row's previous code >> cs, times a class (keys:
  the channel's RoPE band; values: the previous 4 channels' codes at the token), chosen by the encoder
  by cost (mode 2 only if it saves MODE2_MIN_GAIN).
- scale/zero: a layer's fp16 `*_scale`/`*_zero` pair joins its codes' stream when its shape fits the
  KIVI layout (keys [*lead, G, D] with T % G == 0 and D <= n; values [*lead, T, G] with n % G == 0).
  After the codes they are predicted from decoded neighbours and their groups' code statistics
  (`ans.predict`); residuals mod 2^16 of order-preserving images of the fp16 patterns are coded as rANS
  symbols (bit length, next bit, sign; order 0) plus raw low bits.
- every other tensor (outlier tables, 16-bit sides, odd shapes or dtypes): byte planes (`*_oidx`
  delta-coded along the last axis first) in one zstd frame.

Payload (little-endian):
    u32 crc32 of everything after it | u8 FORMAT | u32 table bytes | u32 raw bytes | u32 zstd bytes
    per stream: u8 cs | mode << 4, W code words [, W scale words, W zero words]
    table bits | rANS words (u16) of each stream: codes [, scale, zero] | raw bits | zstd frame
W: u8 lanes | u32 words of a shared stream (`kvstore.codec.rans`): the most lanes of simd.WIDTHS (decoded
by the vector kernels of `kvstore.codec.simd`, context modes 0 and 1) whose extra lane states cost at most
SIMD_MAX_COST of the stream, else NL lanes. FORMAT is the only format read or written: the pre-release
formats 1 (NL lanes, one u32) and 2 (NL lanes, a word stream each) were dropped before the first release.

Invariants:
- `decode_block(encode_block(t, bits), layout_of(t), bits)` is bit-identical to `t` (dtype, shape,
  bytes) for any arrays of supported dtypes; decoded arrays are fresh, writable and C-contiguous.
- A payload that does not match the layout (truncated, flipped, trailing or garbage bytes) raises
  ContainerError; every size is bounded by the layout before anything is allocated.
"""

from __future__ import annotations

import math
import struct
import zlib

import numpy as np
import zstandard

from kvstore.codec import ans, lanes, rans, simd
from kvstore.codec.plan import Layout, Stream, plan_of
from kvstore.codec.plan import block_error as _err
from kvstore.codec.streams import _planes, _unplanes

CODER_ID = 3  # "rans-ctx block coder v1" (after Codec RAW=0, ZSTD=1, ZSTD_STREAMS=2)
FORMAT = 3  # shared word streams of NL or simd.WIDTHS lanes (vector decoding), chosen per stream
SIMD_MAX_COST = 0.01  # the vector layouts' extra lane states (4 bytes each) may cost 1% of a stream (0.03% of
# a SmolLM2 block: a block's scale/zero streams are ~1% of it)
ZSTD_LEVEL = 3
_HEAD = struct.Struct("<IBIII")  # crc, format, table bytes, raw bytes, zstd bytes
_CTX = struct.Struct("<B")  # cs | mode << 4
_WORDS = struct.Struct("<BI")  # a stream's lanes and words
_META_BITS = 6
MODE2_MIN_GAIN = 0.01  # measured on SmolLM2 value streams: mode 2 saves 0.4% of a block's bits, costs ~8% decode time
_META_ALPHABET = 1 << _META_BITS  # ans.symbolize: symbols < 63

# ---- frequency tables ----------------------------------------------------------------------------
def _qtable(cnt: np.ndarray) -> np.ndarray:
    """Counts [C, A] -> log-scale codes (0 = absent; weight ~ 16 * 2^((q-1)/4), see ans.normalize)."""
    with np.errstate(divide="ignore"):
        q = np.rint(4 * np.log2(cnt.astype(np.float64))) + 1
    return np.where(cnt > 0, np.clip(q, 1, ans.QMAX), 0).astype(np.int64)


def _table_bits(q: np.ndarray) -> int:  # bits of ans.put_table(q)
    pred = np.pad(q, ((1, 0), (1, 0)))
    pred = pred[1:, :-1] + pred[:-1, 1:] - pred[:-1, :-1]
    pred[0, 1:], pred[1:, 0] = q[0, :-1], q[:-1, 0]
    d = q - pred
    return int((2 * np.floor(np.log2((np.where(d >= 0, 2 * d, -2 * d - 1) >> 1) + 1)) + 2).sum())


def _ideal_bits(cnt: np.ndarray) -> float:
    tot = cnt.sum(1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        return float(np.nansum(cnt * np.log2(np.where(cnt > 0, tot / cnt, 1.0))))


def _by_shift(cnt: np.ndarray, bits: int, cs: int) -> np.ndarray:
    """Counts [classes * (A+1), A] by full context (previous code, A = row start) -> [classes * P, A] by
    table row class * P + (previous >> cs), P = (A >> cs) + 1."""
    a = 1 << bits
    c = cnt.reshape(-1, a + 1, a)
    return np.concatenate([c[:, :a].reshape(c.shape[0], a >> cs, 1 << cs, a).sum(2), c[:, a:]], 1).reshape(-1, a)


def _choose_context(s: Stream, sym: np.ndarray) -> tuple[int, int, np.ndarray, np.ndarray]:
    """-> (mode, cs, counts [table rows, A], table row of every code) of the cheapest context model,
    tables included; mode 0 is tried too (its counts are the richest mode's summed over classes). Mode 2
    must be MODE2_MIN_GAIN cheaper to be taken: its 3 table classes and per-token classes decode slower."""
    a, best = 1 << s.bits, None
    mode = s.modes[-1]
    full, cnt = ans.contexts(sym, s.t, s.n, mode, s.gv, s.bits)
    for m, c0 in {mode: cnt, 0: cnt.reshape(-1, a + 1, a).sum(0)}.items():
        for cs in range(s.bits + 1):
            if ans.NCLS[m] * (a >> cs) * a <= 16384:
                c = _by_shift(c0, s.bits, cs)
                cost = (_ideal_bits(c) + _table_bits(_qtable(c))) * (1 + MODE2_MIN_GAIN * (m == 2))
                if best is None or cost < best[0]:
                    best = (cost, m, cs, c)
                elif cs:
                    break  # costs rise with the shift once past the best
    _, m, cs, c = best
    p = (a >> cs) + 1
    prev = np.arange(a + 1)
    smap = (np.arange(ans.NCLS[mode])[:, None] * (p if m == mode else 0) + np.where(prev < a, prev >> cs, p - 1))
    return m, cs, c, smap.reshape(-1)[full].astype(np.int32)


class _Bits:
    """A zeroed bit buffer (LSB first) with the 4 bytes of slack the ans bit kernels need."""

    def __init__(self, nbits: int, data: bytes | None = None):
        self.buf = np.zeros(nbits // 8 + 8, np.uint8)
        if data is not None:
            self.buf[: len(data)] = np.frombuffer(data, np.uint8)
        self.lim, self.pos = nbits, 0

    def bytes(self) -> bytes:
        return self.buf[: (self.pos + 7) // 8].tobytes()


def _lanes(mode: int, rows: int, cnt: np.ndarray) -> int:
    """Lanes of a shared stream of `rows` rows with table counts cnt."""
    budget = SIMD_MAX_COST * _ideal_bits(cnt) / 8
    fit = [w for w in simd.WIDTHS if rows >= w and 4 * (w - ans.NL) <= budget]
    return max(fit) if mode < 2 and fit else ans.NL


def _encode_symbols(sym: np.ndarray, ctx: np.ndarray | None, t: int, cnt: np.ndarray, tables: _Bits,
                    nl: int) -> tuple[np.ndarray, tuple[int, int]]:
    """(rANS words, the stream's _WORDS fields) of a code stream (ctx: table row of every code), or
    (ctx None) of residual symbols: nl rows (zero padded) with one table, transmitted once for both
    contexts of the decoder."""
    q = _qtable(cnt)
    tables.pos = ans.put_table(tables.buf, tables.pos, q if ctx is not None else q[:1])
    freq = ans.normalize(q)
    if ctx is None:
        t, ctx = sym.size // nl, np.zeros(sym.size, np.int32)
    start = np.cumsum(freq, 1) - freq
    w = rans.rans_encode_shared(sym, ctx, t, freq, start, nl)
    return w, (nl, w.size)


def _predict(s: Stream, sym: np.ndarray, sc, z, rs, rz, decode: bool, w: int = 0) -> None:
    """ans.predict with the group statistics of sym: channel-major, or lane-major in groups of w lanes."""
    keys = s.kind == "k"
    args = (s.t, s.n, keys, s.mshape[-2 if keys else -1], s.mshape[-1])
    s1, lsc, cnt = lanes.group_stats(sym, w, *args) if w else ans.group_stats(sym, *args)
    ans.predict(s1, lsc, cnt, s.neighbours, 1.0 if keys else 0.5, sc, z, rs, rz, decode)


def _lane_major(s: Stream, nl: int) -> int:  # the lane count if stream s decodes lane-major, else 0
    keys = s.kind != "v"
    ng = s.mshape[-2 if keys else -1] if s.kind else 1  # scale/zero groups (token groups for keys)
    return nl if nl in simd.WIDTHS and lanes.fits(nl, s.n, s.bits, keys, ng) else 0


# ---- encode ------------------------------------------------------------------------------------------
def encode_block(tensors: list[tuple[str, np.ndarray]], bits: dict[str, int]) -> bytes:
    """Encode one block's tensors (layout order). Raises ContainerError for unsupported input."""
    if not all(isinstance(it, tuple) and len(it) == 2 and isinstance(it[1], np.ndarray) for it in tensors):
        raise _err("each tensor must be a (name, numpy array) pair")
    arrays = [a for _, a in tensors]
    plan = plan_of([(n, a.dtype, a.shape) for n, a in tensors], bits)
    n_entries = sum(((1 << s.bits) + 1) * (1 << s.bits) + 2 * _META_ALPHABET for s in plan.streams)
    tables = _Bits(n_entries * 20 + 64)
    raw = _Bits(28 * sum(s.nmeta for s in plan.streams) + 64)
    heads, words = [], []
    for s in plan.streams:
        packed = np.concatenate([arrays[i].reshape(-1, s.t, s.m) for i in s.codes])
        sym = ans.unpack_rows(packed, s.bits)  # [rows, n, T] channel-major
        mode, cs, cnt, ctx = _choose_context(s, sym)
        w, fields = _encode_symbols(sym, ctx, s.t, cnt, tables, _lanes(mode, sym.size // s.t, cnt))
        words.append(w)
        heads.append(_CTX.pack(cs | mode << 4) + _WORDS.pack(*fields))
        if s.kind:
            shape = (-1,) + s.mshape[-2:]
            sc = np.concatenate([arrays[a].reshape(shape) for a, _ in s.metas]).view(np.uint16)
            z = np.concatenate([arrays[b].reshape(shape) for _, b in s.metas]).view(np.uint16)
            rs, rz = np.empty(sc.size, np.int32), np.empty(sc.size, np.int32)
            _predict(s, sym, sc.reshape(-1), z.reshape(-1), rs, rz, False)
            for res in (rs, rz):
                ms = np.empty(res.size, np.uint8)
                raw.pos = ans.symbolize(res, ms, raw.buf, raw.pos)
                cnt = np.bincount(ms, minlength=_META_ALPHABET)[None]
                nl = _lanes(0, ms.size, cnt)
                ms = np.concatenate([ms, np.zeros(-ms.size % nl, np.uint8)])  # nl rows, zero padded
                cnt = np.bincount(ms, minlength=_META_ALPHABET)[None].repeat(2, 0)  # one table for both contexts
                w, fields = _encode_symbols(ms, None, 0, cnt, tables, nl)
                words.append(w)
                heads.append(_WORDS.pack(*fields))
    gen = b""
    if plan.generic:
        body = b"".join(_generic_forward(plan.layout[i][0], arrays[i]).tobytes() for i in plan.generic)
        gen = zstandard.ZstdCompressor(level=ZSTD_LEVEL, write_content_size=True).compress(body)
    tab, rb = tables.bytes(), raw.bytes()
    tail = b"".join(heads) + tab + b"".join(w.astype("<u2").tobytes() for w in words) + rb + gen
    head = _HEAD.pack(0, FORMAT, len(tab), len(rb), len(gen))[4:]
    return struct.pack("<I", zlib.crc32(head + tail)) + head + tail


def _generic_forward(name: str, a: np.ndarray) -> np.ndarray:
    a = np.ascontiguousarray(a)
    if name.endswith("_oidx") and a.dtype.kind in "iu" and a.ndim and a.shape[-1]:
        u = a.astype(a.dtype.newbyteorder("<")).view(f"<u{a.dtype.itemsize}")
        a = np.diff(u, axis=-1, prepend=np.zeros_like(u[..., :1]))  # wraps mod 2^bits
    return _planes(a) if a.dtype.itemsize > 1 else a.reshape(-1).view(np.uint8)


def _generic_inverse(name: str, data: np.ndarray, dt: np.dtype, shape) -> np.ndarray:
    if dt.itemsize == 1:
        return data.view(dt).reshape(shape).copy()
    if name.endswith("_oidx") and dt.kind in "iu" and len(shape) and shape[-1]:
        u = _unplanes(data, np.dtype(f"<u{dt.itemsize}"), shape)
        return np.cumsum(u, axis=-1, dtype=u.dtype).view(dt.newbyteorder("<")).astype(dt)
    return np.array(_unplanes(data, dt, shape), dtype=dt, order="C")


# ---- decode ------------------------------------------------------------------------------------------
class _Reader:
    def __init__(self, data: memoryview):
        self.data, self.pos = data, 0

    def take(self, n: int, what: str) -> memoryview:
        if n > len(self.data) - self.pos:
            raise _err(f"truncated payload: {what} needs {n} bytes at offset {self.pos}, "
                       f"{len(self.data) - self.pos} left")
        self.pos += n
        return self.data[self.pos - n:self.pos]

    def unpack(self, st: struct.Struct, what: str) -> tuple:
        return st.unpack(self.take(st.size, what))


def _shared(counts: tuple) -> tuple[int, int]:  # a stream's _WORDS fields -> (lanes, words in all), checked
    if counts[0] not in rans.SHARED_LANES:
        raise _err(f"a rANS stream of {counts[0]} lanes is impossible (lanes: {rans.SHARED_LANES})")
    return counts[0], counts[1]


def _words(r: _Reader, counts: tuple, nsym: int, what: str) -> np.ndarray:  # a view of the payload
    nl, nw = _shared(counts)
    if nw < 2 * nl or nw > nsym + 2 * nl:
        raise _err(f"{what}: {counts} rANS words for {nsym} symbols is impossible")
    return np.frombuffer(r.take(2 * nw, what), "<u2").astype(np.uint16, copy=False)


def _decode_symbols(w: np.ndarray, counts: tuple, nsym: int, s: Stream | None, mode: int, cs: int, tables: _Bits,
                    what: str, lane_major: bool = False) -> np.ndarray:  # inverse of _encode_symbols
    bits = s.bits if s else _META_BITS
    a, nctx = 1 << bits, ans.NCLS[mode] * (((1 << bits) >> cs) + 1)
    lut, tables.pos = ans.table_lut(tables.buf, tables.lim, tables.pos, nctx if s else 1, a, 1 if s else 2)
    if tables.pos < 0:
        raise _err(f"{what}: corrupt frequency table")
    nl, nw = _shared(counts)
    out = np.empty(nsym if s else nsym + -nsym % nl, np.uint8)
    t, n, gv = (s.t, s.n, s.gv) if s else (out.size // nl, 1, 1)
    if nl not in simd.WIDTHS:  # the scalar decoders read the words with zeros after them
        w = np.concatenate([w, np.zeros(rans.padding(t), np.uint16)])
    ok = rans.decode_shared(w, nw, out, t, n, mode, gv, cs, bits, lut, nl, lane_major)
    if ok != 0:
        raise _err(f"{what}: corrupt rANS stream")
    return out[:nsym]


def decode_block(payload: bytes, layout: Layout, bits: dict[str, int], *,
                 verified: bool = False) -> list[tuple[str, np.ndarray]]:
    """Inverse of encode_block for a block of this layout; raises ContainerError on any mismatch.

    `verified`: the caller already checked these exact bytes with a stronger checksum (the container's),
    so the payload's own CRC need not be computed again."""
    if not isinstance(payload, (bytes, bytearray, memoryview)):
        raise _err(f"payload must be bytes, not {type(payload).__name__}")
    plan = plan_of(layout, bits)
    r = _Reader(memoryview(payload).cast("B"))
    crc, fmt, n_tab, n_raw, n_gen = r.unpack(_HEAD, "header")
    if not verified and zlib.crc32(r.data[4:]) != crc:
        raise _err("checksum mismatch: the payload is corrupt")
    if fmt != FORMAT:
        raise _err(f"unknown block format {fmt} (this build reads {FORMAT})")
    heads, wst = [], _WORDS
    for i, s in enumerate(plan.streams):
        ctx, = r.unpack(_CTX, f"stream {i} header")
        nw = r.unpack(wst, f"stream {i} header")
        cs, mode = ctx & 15, ctx >> 4
        if cs > s.bits or mode not in s.modes:
            raise _err(f"stream {i}: invalid context model (shift {cs}, mode {mode})")
        heads.append((cs, mode, nw, [r.unpack(wst, f"stream {i} header") for _ in "sz"] if s.kind else ()))
    tables = _Bits(8 * n_tab, r.take(n_tab, "frequency tables"))
    streams = []
    for i, (s, (_, _, nw, mw)) in enumerate(zip(plan.streams, heads)):
        wc = _words(r, nw, s.nsym, f"stream {i} codes")
        padded = [-(-s.nmeta // nl) * nl for nl, _ in (_shared(k) for k in mw)]  # residuals in whole rows
        streams.append((wc, nw, [(_words(r, k, n, f"stream {i} scales/zeros"), k) for k, n in zip(mw, padded)]))
    raw = _Bits(8 * n_raw, r.take(n_raw, "raw bits"))
    gen = r.take(n_gen, "generic tensors")
    if r.pos != len(r.data):
        raise _err(f"{len(r.data) - r.pos} unexpected trailing bytes")
    out: list = [None] * len(plan.layout)
    for i, (s, (cs, mode, _, _), (wc, nw, metas)) in enumerate(zip(plan.streams, heads, streams)):
        lm = _lane_major(s, _shared(nw)[0])
        sym = _decode_symbols(wc, nw, s.nsym, s, mode, cs, tables, f"stream {i} codes", lane_major=lm > 0)
        if lm:
            packed = np.empty((s.rows, s.t, s.m), np.uint8)
            lanes.pack(sym, lm, s.t, s.n, s.bits, packed)
        else:
            packed = ans.pack_rows(sym, s.bits, (s.rows, s.t, s.m))
        packed = packed.reshape((len(s.codes),) + s.shape)
        for j, a in zip(s.codes, packed):
            out[j] = a
        if metas:
            res = []
            for w, nwm in metas:
                ms = _decode_symbols(w, nwm, s.nmeta, None, 0, _META_BITS, tables, f"stream {i} scales/zeros")
                res.append(np.empty(s.nmeta, np.int32))
                raw.pos = ans.desymbolize(ms, raw.buf, raw.lim, raw.pos, res[-1])
                if raw.pos < 0:
                    raise _err(f"stream {i}: corrupt scale/zero residuals")
            sc, z = (np.empty((len(s.metas),) + s.mshape, np.uint16) for _ in "sz")
            _predict(s, sym, sc.reshape(-1), z.reshape(-1), res[0], res[1], True, lm)
            for (ja, jb), a, b in zip(s.metas, sc.view(np.float16), z.view(np.float16)):
                out[ja], out[jb] = a, b
    if (tables.pos + 7) // 8 != n_tab or (raw.pos + 7) // 8 != n_raw:
        raise _err("frequency tables or raw bits do not match their sizes")
    _decode_generic(out, plan.layout, plan.generic, gen)
    return [(name, a if a.dtype == dt else a.astype(dt)) for (name, dt, _), a in zip(plan.layout, out)]


def _decode_generic(out: list, layout: Layout, generic: list[int], gen: memoryview) -> None:
    sizes = [math.prod(layout[j][2]) * layout[j][1].itemsize for j in generic]
    if not generic and len(gen):
        raise _err(f"{len(gen)} bytes of generic tensors, the layout has none")
    if not generic:
        return
    try:
        declared = zstandard.get_frame_parameters(gen).content_size
        if declared != sum(sizes):
            raise _err(f"generic tensors: the zstd frame declares {declared} bytes, the layout needs {sum(sizes)}")
        dobj = zstandard.ZstdDecompressor().decompressobj()
        body = np.frombuffer(dobj.decompress(gen), np.uint8)  # bounded by the declared (= layout) size
        if not dobj.eof or dobj.unused_data or body.size != sum(sizes):
            raise _err("generic tensors: truncated or oversized zstd frame")
    except zstandard.ZstdError as e:
        raise _err(f"generic tensors do not decompress: {e}") from None
    for j, p, n in zip(generic, np.cumsum([0] + sizes), sizes):
        out[j] = _generic_inverse(layout[j][0], body[p:p + n], layout[j][1], layout[j][2])
