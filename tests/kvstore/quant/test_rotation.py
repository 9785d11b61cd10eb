import pytest
import torch

from kvstore.config import QuantConfig
from kvstore.quant.cache import QuantizedKVCache
from kvstore.quant.rotation import hadamard, hadamard_matrix, hadamard_rows


@pytest.mark.parametrize("d", [1, 2, 16, 64, 128])
def test_orthonormal_involution(d):
    h = hadamard_matrix(d)
    assert torch.allclose(h @ h.T, torch.eye(d), atol=1e-6)
    x = torch.randn(3, 5, d)
    assert torch.allclose(hadamard(hadamard(x)), x, atol=1e-5)
    assert torch.allclose(hadamard(x).norm(dim=-1), x.norm(dim=-1), rtol=1e-5)


def test_not_power_of_two():
    with pytest.raises(ValueError, match="power-of-two"):
        hadamard_matrix(48)


def test_rotation_flattens_a_channel_outlier_and_cuts_error():
    g = torch.Generator().manual_seed(0)
    k = torch.randn(1, 2, 256, 64, generator=g)
    v = torch.randn(1, 2, 256, 64, generator=g)
    v[..., 3] *= 30  # an outlier channel: per-token value groups suffer
    errs = {}
    for spec in ("int4:g32:gv32:r0", "int4:g32:gv32:r0:had"):
        c = QuantizedKVCache(QuantConfig.parse(spec), 1)
        _, vv = c.update(k, v, 0)
        errs[spec] = float((vv - v).pow(2).mean())
    assert errs["int4:g32:gv32:r0:had"] < 0.5 * errs["int4:g32:gv32:r0"]


def test_rotated_cache_roundtrips_exactly_and_spec_is_stable():
    q = QuantConfig.parse("int4:g32:gv16:r8:had")
    assert q.rotate and q.spec().endswith(":had") and QuantConfig.parse(q.spec()) == q
    assert not QuantConfig.parse("int4").spec().endswith(":had")
    c = QuantizedKVCache(q, 1)
    c.update(torch.randn(1, 2, 100, 16), torch.randn(1, 2, 100, 16), 0)
    s = c.export_state()
    assert QuantizedKVCache.from_state(s).export_state().equals(s)
    with pytest.raises(ValueError, match="power-of-two"):
        QuantizedKVCache(QuantConfig.parse("int4:gv8:had"), 1).update(torch.randn(1, 1, 4, 24), torch.randn(1, 1, 4, 24), 0)


@pytest.mark.parametrize("d", [1, 2, 8, 64, 128])
def test_hadamard_rows_is_the_same_rotation_computed_row_by_row(d):
    torch.manual_seed(d)
    x = torch.randn(3, 2, 9, d) * 10
    x0 = x.clone()
    y = hadamard_rows(x)
    assert torch.equal(x, x0)  # the input is left as it was
    assert torch.equal(hadamard_rows(x.transpose(0, 2)), y.transpose(0, 2))  # any strides
    assert torch.allclose(y, hadamard(x), atol=1e-5, rtol=1e-5)
    assert torch.allclose(hadamard_rows(y), x, atol=1e-4)
    # a row's rotation is its own: computed alone, or among any other rows, the bits are the same
    for i in range(9):
        assert torch.equal(hadamard_rows(x[:, :, i:i + 1]), y[:, :, i:i + 1])
    assert torch.equal(hadamard_rows(x[1:2]), y[1:2])
    assert hadamard_rows(x.bfloat16()).dtype == torch.bfloat16


def test_hadamard_rows_refuses_a_dim_that_is_not_a_power_of_two():
    with pytest.raises(ValueError, match="power-of-two"):
        hadamard_rows(torch.zeros(2, 48))
