"""The block coding plan (`kvstore.codec.plan`): which tensors are coded together, as a pure function of
the layout and bit widths, and every invalid layout refused with a ContainerError."""

import numpy as np
import pytest

from kvstore.codec.container import ContainerError
from kvstore.codec.plan import MAX_BLOCK_BYTES, plan_of

U8, F16 = np.dtype(np.uint8), np.dtype(np.float16)


def _layout(layers=3, h=3, t=128, d=64, g=32, gv=32, outliers=False):
    out = []
    for layer in range(layers):
        out += [(f"{layer}.k_codes", U8, (1, h, t, d // 2)), (f"{layer}.k_scale", F16, (1, h, t // g, d)),
                (f"{layer}.k_zero", F16, (1, h, t // g, d)), (f"{layer}.v_codes", U8, (1, h, t, d // 2)),
                (f"{layer}.v_scale", F16, (1, h, t, d // gv)), (f"{layer}.v_zero", F16, (1, h, t, d // gv))]
        if outliers:
            out += [(f"{layer}.k_oidx", np.dtype(np.int16), (1, h, t, 2))]
    return out


def test_a_kivi_block_plans_one_key_and_one_value_stream_with_their_scales():
    layout = _layout(outliers=True)
    bits = {n: 4 for n, _, _ in layout if n.endswith("_codes")}
    plan = plan_of(layout, bits)
    assert [(s.kind, len(s.codes), len(s.metas), s.n, s.gv) for s in plan.streams] == [("k", 3, 3, 64, 64),
                                                                                      ("v", 3, 3, 64, 32)]
    assert [layout[i][0] for i in plan.generic] == ["0.k_oidx", "1.k_oidx", "2.k_oidx"]
    assert plan_of(layout, bits) is plan  # cached: a session's blocks share one layout


def test_scales_that_do_not_fit_the_kivi_layout_are_coded_generically():
    layout = [(n, dt, (1, 3, 100, 64) if n.endswith("k_scale") or n.endswith("k_zero") else s)
              for n, dt, s in _layout(layers=1)]
    plan = plan_of(layout, {"0.k_codes": 4, "0.v_codes": 4})
    assert plan.streams[0].kind == "" and {layout[i][0] for i in plan.generic} == {"0.k_scale", "0.k_zero"}


@pytest.mark.parametrize("layout,bits,needle", [
    ([("a", U8, (2,)), ("a", U8, (2,))], {}, "invalid layout entry"),
    ([("x", np.dtype(np.complex64), (2,))], {}, "invalid layout entry"),
    ([("x", U8, (-1, 2))], {}, "invalid layout entry"),
    ([("0.k_codes", U8, (1, 1, 4, 2))], {"0.k_codes": 9}, "bit width"),
    ([("0.k_codes", U8, (1, 1, 4, 2))], {"0.k_codes": True}, "bit width"),
    ([("0.k_codes", U8, (1, 1, 4, 2))], {}, "bit width"),
    ([("big", U8, (MAX_BLOCK_BYTES + 1,))], {}, "limit"),
    ([("x", U8, "not a shape")], {}, "invalid layout"),
])
def test_invalid_layouts_are_refused(layout, bits, needle):
    with pytest.raises(ContainerError, match=needle):
        plan_of(layout, bits)
    with pytest.raises(ContainerError, match="bits must be a dict"):
        plan_of([("x", U8, (2,))], [("x", 4)])
