"""The vector rANS kernels (`kvstore.codec.simd`) on their own: any width, builds for other CPUs, lane-major
output equal to the scalar decoders', and the Python entry point's argument checks."""

import platform

import numpy as np
import pytest

from kvstore.codec import ans, rans, simd
from tests.kvstore.codec.test_rans import _stream

_X86 = platform.machine() in ("x86_64", "AMD64")


@pytest.mark.parametrize("w,cpu", [(32, None), (simd.LANES, "generic"), (16, "haswell" if _X86 else "generic")])
def test_the_kernel_is_the_same_at_other_widths_and_on_other_cpus(w, cpu):
    """The IR is generated for any lane count; a 32-lane build (not one the format uses) decodes 32-lane
    streams like the scalar code, lane-major. So do builds for CPUs without AVX-512 (x86: haswell, AVX2) or
    any vector extension ("generic": baseline x86-64 here): LLVM lowers the gathers and expanding loads
    differently (scalar code), with the same results."""
    rows, t_n, n, mode, cs, bits = 3 * w, 30, 16, 1, 0, 4
    sym, ctx, freq, start, lut = _stream(11, rows, t_n, n, mode, n, cs, bits)
    words = rans.rans_encode_shared(sym, ctx, t_n, freq, start, w)
    padded = np.concatenate([words, np.zeros(w * t_n + 1, np.uint16)])  # the zeros the raw kernel reads past nw
    p_n = ((1 << bits) >> cs) + 1
    st, ro = rans._simd_setup(padded, n, mode, p_n * ans.M, rows // w, w)
    pos, lanes = np.array([2 * w], np.int64), np.empty(rows * t_n, np.uint8)
    assert simd.decode_groups(padded, lut, lanes, ro, st, pos, t_n, rows // w, cs, (p_n - 1) * ans.M, words.size,
                              w, cpu) == 0
    assert pos[0] == words.size and (st == ans.RL).all()
    assert (lanes.reshape(rows // w, t_n, w).transpose(0, 2, 1).reshape(-1) == sym).all()


def test_the_entry_point_checks_the_arrays_the_kernel_trusts():
    sym, ctx, freq, start, lut = _stream(2, simd.LANES, 8, 8, 0, 8, 0, 4)
    words = rans.rans_encode_shared(sym, ctx, 8, freq, start, simd.LANES)
    padded = np.concatenate([words, np.zeros(simd.LANES * 8 + 1, np.uint16)])
    ok = dict(words=padded, lut=lut, out=np.empty(sym.size, np.uint8), ro=np.zeros(simd.LANES, np.uint32),
              st=np.zeros(simd.LANES, np.uint32), pos=np.zeros(1, np.int64))
    for name, bad in [("out", np.empty(1, np.uint8)), ("lut", lut.astype(np.int64)), ("st", np.zeros(3, np.uint32)),
                      ("words", padded[:words.size]), ("ro", np.zeros(simd.LANES, np.int32))]:
        with pytest.raises(ValueError, match="bad"):
            simd.decode_groups(**{**ok, name: bad}, t_n=8, groups=1, cs=0, first=16 * ans.M, nw=words.size)


def test_the_kernel_uses_avx512_gathers_and_expanding_loads_where_the_cpu_has_them():
    """What the speed rests on (BENCHMARKS.md); on other CPUs LLVM lowers the same IR differently."""
    import llvmlite.binding as llvm

    llvm.initialize_native_target()
    if "+avx512f" not in llvm.get_host_cpu_features().flatten().split(","):
        assert "vpgatherdd" not in simd.asm(simd.LANES, "generic")
        return
    code = simd.asm()
    assert "vpgatherdd" in code and "vpexpandw" in code
