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
])
def test_parse(spec, expect):
    assert QuantConfig.parse(spec) == expect


@pytest.mark.parametrize("spec,needle", [
    ("", "empty"), ("int5", "unknown KV scheme"), ("int4:x9", "unknown KV spec knob"),
    ("int4:k5v4", "key_bits=5"), ("int4:g0", "key_group"),
])
def test_parse_rejects(spec, needle):
    with pytest.raises(QuantConfigError, match=needle):
        QuantConfig.parse(spec)


@given(k=st.sampled_from([2, 3, 4, 8, 16]), v=st.sampled_from([2, 3, 4, 8, 16]),
       g=st.integers(1, 4096), gv=st.integers(1, 4096), r=st.integers(0, 10000))
def test_spec_roundtrip(k, v, g, gv, r):
    c = QuantConfig(k, v, g, gv, r)
    assert QuantConfig.parse(c.spec()) == c or c.is_full_precision
