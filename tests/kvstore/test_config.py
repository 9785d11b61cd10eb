import pytest
from hypothesis import given
from hypothesis import strategies as st

from kvstore.config import QuantConfig, QuantConfigError


@pytest.mark.parametrize("spec,expect", [
    ("fp", QuantConfig(16, 16)),
    ("int4", QuantConfig(4, 4)),
    ("int8:r64", QuantConfig(8, 8, residual=64)),
    ("int4:k4v2:g64:r128", QuantConfig(4, 2, key_group=64, residual=128)),
    ("INT3:gv16", QuantConfig(3, 3, value_group=16)),
    ("int4:hadv:hadattn", QuantConfig(4, 4, rotate="v", rotated_attention=True)),
    ("int2:out0.01:prerope", QuantConfig(2, 2, outliers=0.01, pre_rope=True)),
    ("int4:lb84f2", QuantConfig(4, 4, layer_bits=((8, 4), (16, 2)))),
    ("int4:k8v4:r128:w8", QuantConfig(8, 4, residual=128, window_bits=8)),
    ("int4:w16", QuantConfig(4, 4)),
    ("int:k2v2:g128:clip", QuantConfig(2, 2, key_group=128, clip="kv")),
    ("int2:clipv", QuantConfig(2, 2, clip="v")),
])
def test_parse(spec, expect):
    assert QuantConfig.parse(spec) == expect


@pytest.mark.parametrize("spec,needle", [
    ("", "empty"), ("int5", "unknown KV scheme"), ("int4:x9", "unknown KV spec knob"),
    ("int4:k5v4", "key_bits=5"), ("int4:g0", "key_group"), ("int4:hadattn", "needs a rotation"),
    ("int4:out0.5", "outliers"), ("int4:lb845", "unknown KV spec knob"), ("fp:w8", "needs a quantized spec"),
    ("int4:w4", "unknown KV spec knob"), ("int4:cw91", "unknown KV spec knob"), ("int4:cw4", "unknown KV spec knob"), ("fp:clip", "clip needs a quantized spec"),
])
def test_parse_rejects(spec, needle):
    with pytest.raises(QuantConfigError, match=needle):
        QuantConfig.parse(spec)


BITS = st.sampled_from([2, 3, 4, 8, 16])


@given(k=BITS, v=BITS, g=st.integers(1, 4096), gv=st.integers(1, 4096), r=st.integers(0, 10000),
       rot=st.sampled_from(["", "k", "v", "kv"]), out=st.sampled_from([0.0, 0.005, 0.01, 1e-4, 0.25]),
       pre=st.booleans(), lb=st.lists(st.tuples(BITS, BITS), max_size=5), w=st.sampled_from([8, 16]),
       clip=st.sampled_from(["", "k", "v", "kv"]), cw=st.tuples(st.integers(2, 8), st.integers(2, 8)))
def test_spec_roundtrip(k, v, g, gv, r, rot, out, pre, lb, w, clip, cw):
    fp = QuantConfig(k, v, layer_bits=tuple(lb)).is_full_precision
    c = QuantConfig(k, v, g, gv, r, rotate=rot, rotated_attention=bool(rot), outliers=out, pre_rope=pre,
                    layer_bits=tuple(lb), window_bits=16 if fp else w, clip="" if fp else clip, cold_window_bits=cw)
    assert QuantConfig.parse(c.spec()) == c or c.is_full_precision


def test_window_bits_name_only_w8():
    # the spec is hashed into block names: a w16 spec is spelled as before, w8 adds one knob
    assert QuantConfig.parse("int4:k8v4:g32:r128").spec() == "int:k8v4:g32:gv32:r128"
    assert QuantConfig.parse("int4:k8v4:g32:r128:s4:w8").spec() == "int:k8v4:g32:gv32:r128:w8:s4"
    assert QuantConfig.parse("int2:clip:g64").spec() == "int:k2v2:g64:gv32:r128:clip"  # clip adds one knob too
    assert QuantConfig.parse("int2:clipv").spec() == "int:k2v2:g32:gv32:r128:clipv"
    assert QuantConfig.parse("int4:k8v4:g32:r128:s4:w8").window_bits == 8
    assert QuantConfig.parse("int4:k8v4:g32:r128:cw88").spec() == "int:k8v4:g32:gv32:r128"  # cw88: the default
    assert QuantConfig.parse("int:k16v16:cw43").spec() == "fp:cw43"  # a cold spec keeping every sealed side
    with pytest.raises(QuantConfigError, match="window_bits"):
        QuantConfig(window_bits=4)


def test_bits_for_layers():
    assert QuantConfig.parse("int4:k8v2").bits_for(7) == (8, 2)
    c = QuantConfig.parse("int4:lb84f2")
    assert c.bits_for(0) == (8, 4) and c.bits_for(1) == (16, 2) and not c.is_full_precision
    with pytest.raises(QuantConfigError, match="layer 2"):
        c.bits_for(2)


def test_load_reads_spec_files(tmp_path):
    (tmp_path / "a.toml").write_text('[kv]\nspec = "int4:k8v4:r64"\n')
    (tmp_path / "b.txt").write_text("int2:lb8442\n")
    (tmp_path / "c.toml").write_text('other = 1\n')
    assert QuantConfig.from_spec_or_file(str(tmp_path / "a.toml")) == QuantConfig(8, 4, residual=64)
    assert QuantConfig.from_spec_or_file(str(tmp_path / "b.txt")).layer_bits == ((8, 4), (4, 2))
    assert QuantConfig.from_spec_or_file("int4:out0.01").outliers == 0.01
    with pytest.raises(QuantConfigError, match="no `spec`"):
        QuantConfig.from_spec_or_file(str(tmp_path / "c.toml"))
