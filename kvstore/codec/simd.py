"""A vector rANS decoder, written in LLVM IR and compiled for this CPU by llvmlite (which numba ships).

`decode_groups(...)` decodes the full row groups of the shared word layout (`kvstore.codec.rans`) with
W (WIDTHS) rows side by side: one lane per row, one vector step per token. A step is, for all lanes at
once: table lookup (a gather), state update, and renormalisation, where the lanes that need a word take
the next words of the shared stream in lane order (an expanding load). On AVX-512 these are single
instructions (vpgatherdd, vpexpandw); LLVM lowers the same IR to whatever another CPU has (AVX2 gathers,
or scalar code), so results are identical everywhere and only the speed differs. numba cannot emit
either: it does not vectorise loops with table lookups.

Output is lane-major per group: out[(g * T + t) * W + lane], the symbol of row g * W + lane at token t.

Invariants (as in `kvstore.codec.rans`): 32-bit states, 16-bit words, lut entries
symbol | (slot - start) << 8 | (freq - 1) << 20 in rows of M. Reads stay inside `words` if it holds
>= W * T zeros past `nw` (the position is checked against nw after every group); lut indices stay inside
the table if the row offsets and `first` are, since decoded symbols come from the table itself.
"""

from __future__ import annotations

import ctypes
import functools
import threading

import numpy as np

from kvstore.codec.ans import PB, RL, M

LANES = 64  # rows side by side: four 16-lane vectors on AVX-512 overlap their latencies (measured: 32 lanes
# decode 1.5x slower, 128 no faster)
WIDTHS = (16, LANES)  # the kernels built: 16 lanes for small streams (fewer lane states to store)

_IR = """
declare <{W} x i32> @llvm.masked.gather.v{W}i32.v{W}p0(<{W} x ptr>, i32 immarg, <{W} x i1>, <{W} x i32>)
declare <{W} x i16> @llvm.masked.expandload.v{W}i16(ptr, <{W} x i1>, <{W} x i16>)
declare i{W} @llvm.ctpop.i{W}(i{W})

; words: u16 stream; lut: u32 [rows * M]; out: u8 [groups * t_n * W]; ro: u32 [groups * W] table row
; offsets (times M) of each row; st: u32 [W] states (in and out); pp: i64 word position (in and out).
; -> 0, or -1 when a group read past nw.
define i64 @decode_groups(ptr %words, ptr %lut, ptr %out, ptr %ro, ptr %st, ptr %pp, i64 %t_n, i64 %groups,
                          i64 %cs64, i64 %first64, i64 %nw) {{
entry:
  %x0 = load <{W} x i32>, ptr %st, align 4
  %p0 = load i64, ptr %pp, align 8
  %cs = trunc i64 %cs64 to i32
  %first = trunc i64 %first64 to i32
  %vcs = insertelement <{W} x i32> poison, i32 %cs, i64 0
  %scs = shufflevector <{W} x i32> %vcs, <{W} x i32> poison, <{W} x i32> zeroinitializer
  %vf = insertelement <{W} x i32> poison, i32 %first, i64 0
  %sfirst = shufflevector <{W} x i32> %vf, <{W} x i32> poison, <{W} x i32> zeroinitializer
  %any = icmp sgt i64 %groups, 0
  br i1 %any, label %group, label %done

group:
  %g = phi i64 [ 0, %entry ], [ %g1, %gnext ]
  %xg = phi <{W} x i32> [ %x0, %entry ], [ %xt, %gnext ]
  %pg = phi i64 [ %p0, %entry ], [ %pt, %gnext ]
  %gw = mul i64 %g, {W}
  %rop = getelementptr i32, ptr %ro, i64 %gw
  %o = load <{W} x i32>, ptr %rop, align 4
  %c0 = add <{W} x i32> %o, %sfirst
  %gt = mul i64 %g, %t_n
  br label %tok

tok:
  %j = phi i64 [ 0, %group ], [ %j1, %tok ]
  %x = phi <{W} x i32> [ %xg, %group ], [ %x2, %tok ]
  %p = phi i64 [ %pg, %group ], [ %p2, %tok ]
  %c = phi <{W} x i32> [ %c0, %group ], [ %c2, %tok ]
  %slot = and <{W} x i32> %x, {SPLAT_MASK}
  %idx = add <{W} x i32> %c, %slot
  %ptrs = getelementptr i32, ptr %lut, <{W} x i32> %idx
  %e = call <{W} x i32> @llvm.masked.gather.v{W}i32.v{W}p0(<{W} x ptr> %ptrs, i32 4, <{W} x i1> {SPLAT_TRUE}, <{W} x i32> poison)
  %fm1 = lshr <{W} x i32> %e, {SPLAT_20}
  %f = add <{W} x i32> %fm1, {SPLAT_1}
  %bs = lshr <{W} x i32> %e, {SPLAT_8}
  %bias = and <{W} x i32> %bs, {SPLAT_MASK}
  %xq = lshr <{W} x i32> %x, {SPLAT_PB}
  %xm = mul <{W} x i32> %f, %xq
  %x1 = add <{W} x i32> %xm, %bias
  %nd = icmp ult <{W} x i32> %x1, {SPLAT_RL}
  %wp = getelementptr i16, ptr %words, i64 %p
  %w = call <{W} x i16> @llvm.masked.expandload.v{W}i16(ptr %wp, <{W} x i1> %nd, <{W} x i16> zeroinitializer)
  %wz = zext <{W} x i16> %w to <{W} x i32>
  %xsh = shl <{W} x i32> %x1, {SPLAT_16}
  %xs = or <{W} x i32> %xsh, %wz
  %x2 = select <{W} x i1> %nd, <{W} x i32> %xs, <{W} x i32> %x1
  %ndb = bitcast <{W} x i1> %nd to i{W}
  %cnt = call i{W} @llvm.ctpop.i{W}(i{W} %ndb)
  {CNT64}
  %p2 = add i64 %p, %cnt64
  %s = and <{W} x i32> %e, {SPLAT_255}
  %sb = trunc <{W} x i32> %s to <{W} x i8>
  %row = add i64 %gt, %j
  %ob = mul i64 %row, {W}
  %op = getelementptr i8, ptr %out, i64 %ob
  store <{W} x i8> %sb, ptr %op, align 1
  %sc = lshr <{W} x i32> %s, %scs
  %sr = shl <{W} x i32> %sc, {SPLAT_PB}
  %c2 = add <{W} x i32> %sr, %o
  %j1 = add i64 %j, 1
  %more = icmp slt i64 %j1, %t_n
  br i1 %more, label %tok, label %gend

gend:
  %xt = phi <{W} x i32> [ %x2, %tok ]
  %pt = phi i64 [ %p2, %tok ]
  %over = icmp sgt i64 %pt, %nw
  br i1 %over, label %fail, label %gnext

gnext:
  %g1 = add i64 %g, 1
  %gm = icmp slt i64 %g1, %groups
  br i1 %gm, label %group, label %done_g

done_g:
  store <{W} x i32> %xt, ptr %st, align 4
  store i64 %pt, ptr %pp, align 8
  ret i64 0

done:
  ret i64 0

fail:
  ret i64 -1
}}
"""


def _splat(w: int, v: int, ty: str = "i32") -> str:
    return "<" + ", ".join([f"{ty} {v}"] * w) + ">"


def ir(w: int = LANES) -> str:
    """The kernel's LLVM IR for w lanes."""
    s = {f"SPLAT_{k}": _splat(w, v) for k, v in
         {"MASK": M - 1, "20": 20, "1": 1, "8": 8, "PB": PB, "RL": RL, "16": 16, "255": 255}.items()}
    cast = "zext" if w < 64 else "trunc"
    cnt64 = f"%cnt64 = {cast} i{w} %cnt to i64" if w != 64 else "%cnt64 = add i64 %cnt, 0"
    return _IR.format(W=w, CNT64=cnt64, SPLAT_TRUE=_splat(w, "true", "i1"), **s)


_LOCK = threading.Lock()


def _kernel(w: int = LANES, cpu: str | None = None):
    """Compiled once per process for the host CPU (or, to test the lowering for others, a `cpu` this one
    can run, e.g. "x86-64": no AVX); kept alive with its engine."""
    with _LOCK:
        return _compiled(w, cpu)


@functools.cache
def _compiled(w: int, cpu: str | None):
    import llvmlite.binding as llvm

    llvm.initialize_native_target()
    llvm.initialize_native_asmprinter()
    mod = llvm.parse_assembly(ir(w))
    mod.verify()
    host = cpu is None
    tm = llvm.Target.from_default_triple().create_target_machine(
        cpu=llvm.get_host_cpu_name() if host else cpu, features=llvm.get_host_cpu_features().flatten() if host else "",
        opt=3)
    pb = llvm.create_pass_builder(tm, llvm.create_pipeline_tuning_options(speed_level=3))
    pb.getModulePassManager().run(mod, pb)
    engine = llvm.create_mcjit_compiler(mod, tm)
    engine.finalize_object()
    p, i64, addr = ctypes.c_void_p, ctypes.c_int64, engine.get_function_address("decode_groups")
    return ctypes.CFUNCTYPE(i64, p, p, p, p, p, p, i64, i64, i64, i64, i64)(addr), engine, tm, mod, addr


def address(w: int = LANES) -> int:
    """The w-lane kernel's entry point, for numba code to call (`kvstore.codec.rans`): C signature
    i64 (u16* words, u32* lut, u8* out, u32* ro, u32* st, i64* pos, i64 t_n, groups, cs, first, nw)."""
    return _kernel(w)[4]


def asm(w: int = LANES, cpu: str | None = None) -> str:
    """The kernel's machine code for this CPU or `cpu` (to check what LLVM made of the gathers)."""
    _, _, tm, mod, _ = _kernel(w, cpu)
    return tm.emit_assembly(mod)


def decode_groups(words: np.ndarray, lut: np.ndarray, out: np.ndarray, ro: np.ndarray, st: np.ndarray,
                  pos: np.ndarray, t_n: int, groups: int, cs: int, first: int, nw: int, w: int = LANES,
                  cpu: str | None = None) -> int:
    """Decode `groups` full groups of w rows (see the module doc) -> 0, or -1 past nw. Arrays: words uint16
    (C-contiguous, padded), lut uint32 C-contiguous, out uint8 [groups * t_n * w], ro uint32 [groups * w],
    st uint32 [w], pos int64 [1]; checked here, since the kernel trusts them."""
    for a, dt, n in ((words, np.uint16, nw + w * t_n), (lut, np.uint32, 0), (out, np.uint8, groups * t_n * w),
                     (ro, np.uint32, groups * w), (st, np.uint32, w), (pos, np.int64, 1)):
        if a.dtype != dt or not a.flags.c_contiguous or a.size < n:
            raise ValueError(f"decode_groups: bad {dt.__name__} array of {a.size}")
    fn = _kernel(w, cpu)[0]
    return fn(words.ctypes.data, lut.ctypes.data, out.ctypes.data, ro.ctypes.data, st.ctypes.data,
              pos.ctypes.data, t_n, groups, cs, first, nw)
