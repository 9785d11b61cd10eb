"""Lossy cold mode (kvstore/quant/cold.py): determinism, batch invariance, the device format on the way back,
sinks and window untouched, the stated error bound, and clear errors for what it does not support.

Error bound checked (element-wise; x = device region dequantized, w = the warm region dequantized,
s_c = cold group scale, s_d = new device group scale):
    |x - w| <= s_c / 2 + s_d / 2 + (|x| + s_c) * 2**-9 + 1e-6      plain cold sides
    |x - w| <= s_d / 2 + |x| * 2**-9 + 1e-6                         kept first tokens (s N)
with a Hadamard-rotated cold side per token in L2 norm, and with prerope per RoPE pair (i, i + D/2).
"""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from kvstore.config import QuantConfig
from kvstore.quant import side as sides
from kvstore.quant.cache import QuantizedKVCache
from kvstore.quant.cold import (
    ColdSpecError,
    apply_cold,
    check_specs,
    cold_sinks,
    cold_state,
    cold_window,
    concat_cold,
    grid_dequantize,
    grid_quantize,
    warm_state,
)
from kvstore.quant.layer import QuantizedKVLayer
from kvstore.quant.rope import Rope

B, H, D = 1, 2, 16
DEVICE = QuantConfig.parse("int4:k8v4:g32:gv16:r16")
SPECS = ["int:k3v2:g64:gv16:s1", "int2:g128:gv8:s3:hadv", "int:k4v3:g64:gv16:s2:prerope", "int3:g32:gv16:had",
         "int:k16v2:g64:gv16", "int:k8v16:g64:gv16:s1", "int:k3v2:g64:gv16:s1:hadv:clipv"]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2)  # head_dim 16
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def rope(model):
    return Rope.from_model(model)


def _kv(n, seed):
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(B, H, n, D, generator=g) * torch.linspace(0.2, 3.0, D) + torch.linspace(-2, 2, D)
    k[..., 0, :] *= 8  # a sink-like first token with large keys
    return k, torch.randn(B, H, n, D, generator=g)


def _cache(spec=DEVICE, n=200, layers=2, seed=0):
    c = QuantizedKVCache(spec, layers)
    for i, layer in enumerate(c.layers):
        layer.update(*_kv(n, seed + i))
    return c


def _region(layer):
    return {n: t for n, t in layer.sealed.items() if not n.endswith("_sink")}


def _block(region, a, b, device=DEVICE):
    g = device.key_group
    return {n: t[..., a // g:b // g, :] if n in ("k_scale", "k_zero") else t[..., a:b, :] for n, t in region.items()}


def _equal(x, y):
    return x.keys() == y.keys() and all(x[n].dtype == y[n].dtype and torch.equal(x[n], y[n]) for n in x)


@pytest.mark.parametrize("spec", SPECS)
def test_deterministic_and_batch_invariant(spec, rope):
    cold = QuantConfig.parse(spec)
    region = _region(_cache().layers[0])
    n = region["v_codes"].shape[-2]
    assert n == 160  # 200 tokens, window 16 -> 5 device blocks; cold groups 64 leave a 32-token tail
    whole = cold_state(region, DEVICE, cold, 0, D, rope=rope)
    assert _equal(whole, cold_state(region, DEVICE, cold, 0, D, rope=rope))  # same input, same bits
    g = cold.key_group
    for step in (g, 2 * g):  # one cold group at a time, or two
        starts = list(range(0, n, step))
        parts = [cold_state(_block(region, a, min(a + step, n)), DEVICE, cold, 0, D, start=a, rope=rope)
                 for a in starts]
        assert _equal(concat_cold(parts), whole)
        warm_parts = [warm_state(p, DEVICE, cold, 0, D, position=a, rope=rope) for p, a in zip(parts, starts)]
        joined = {name: torch.cat([w[name] for w in warm_parts], dim=-2) for name in warm_parts[0]}
        assert _equal(joined, warm_state(whole, DEVICE, cold, 0, D, rope=rope))


@pytest.mark.parametrize("spec", SPECS)
def test_warm_state_is_the_device_format(spec, rope):
    cold = QuantConfig.parse(spec)
    region = _region(_cache().layers[1])
    warm = warm_state(cold_state(region, DEVICE, cold, 1, D, rope=rope), DEVICE, cold, 1, D, rope=rope)
    assert {n: (t.shape, t.dtype) for n, t in warm.items()} == {n: (t.shape, t.dtype) for n, t in region.items()}
    kb, vb = cold.bits_for(1)
    for side, bits in (("k", kb), ("v", vb)):
        same = all(torch.equal(warm[n], region[n]) for n in region if n[0] == side)
        assert same == (bits == 16)  # a 16-bit cold side passes through exactly; any other is re-quantized


def test_device_sides_at_16_bits_pass_through():
    device = QuantConfig.parse("int:k8v4:g32:gv16:r16:lb84ff")  # layer 1 keeps both sides in full precision
    region = _region(_cache(device).layers[1])
    assert set(region) == {"k_fp", "v_fp"}
    cold = QuantConfig.parse("int:k3v2:g64:gv16:s1")
    c = cold_state(region, device, cold, 1, D)
    assert _equal(c, region) and _equal(warm_state(c, device, cold, 1, D), region)


def test_apply_cold_rewrites_the_sealed_region_and_rounds_the_sinks():
    device = QuantConfig.parse("int4:k8v4:g32:gv16:r24:s4")
    cache = _cache(device, n=230)
    before = [{n: t.clone() for n, t in layer.tensors().items()} for layer in cache.layers]
    counts = [(layer.num_tokens, layer.n_sealed, layer.n_sink) for layer in cache.layers]
    cold = QuantConfig.parse("int:k3v2:g64:gv16:s1")
    apply_cold(cache, cold)
    for i, layer in enumerate(cache.layers):
        assert (layer.num_tokens, layer.n_sealed, layer.n_sink) == counts[i] == (230, 192, 4)
        after = layer.tensors()
        for name in ("k_win", "v_win"):  # a 16-bit window stays as it is
            assert torch.equal(after[name], before[i][name])
        for name in ("k_sink", "v_sink"):  # fp32 sinks at bf16
            assert after[name].dtype == torch.float32
            assert torch.equal(after[name], before[i][name].to(torch.bfloat16).float())
            assert not torch.equal(after[name], before[i][name])
        region = {n: t for n, t in before[i].items() if n not in ("k_win", "v_win", "k_sink", "v_sink")}
        expected = warm_state(cold_state(region, device, cold, i, D, position=4), device, cold, i, D, position=4)
        assert _equal({n: after[n] for n in expected}, expected)
        assert not torch.equal(after["v_codes"], before[i]["v_codes"])  # lossy: the region did change
    state = cache.export_state()  # the rewritten cache is a valid cache: export, import, keep decoding
    again = QuantizedKVCache.from_state(state)
    assert again.export_state().equals(state)
    k, v = _kv(40, 9)
    keys, _ = again.layers[0].update(k, v)
    assert keys.shape == (B, H, 270, D) and torch.isfinite(keys).all()


def _scales_k(step, n, g):
    sizes = torch.tensor([min(g, n - a) for a in range(0, n, g)])
    return step.transpose(-1, -2).float().repeat_interleave(sizes, dim=-2)  # [B, H, n, 1]


def _read(tensors, side, device=DEVICE):
    """One side of a `device`-format region, dequantized [B, H, n, D] in the original basis."""
    layer = QuantizedKVLayer(device, 0)
    layer.head_dim = D
    return sides.read({n[2:]: t for n, t in tensors.items() if n[0] == side}, layer.plan(side), D)


def _bounds(region, cold, c, warm, device=DEVICE):
    """Per side: (x, w, cold term, device term) as [B, H, n, D] tensors (device-dequantized region); with a
    rotated device side its device term holds in the rotated basis (compare per-token L2 norms then)."""
    out = {}
    for side in "kv":
        x, w = _read(region, side, device), _read(warm, side, device)
        n = x.shape[-2]
        if side == "k":
            s_c = _scales_k(c["kc_step"], n, cold.key_group).expand_as(x)
            s_d = warm["k_scale"].float().repeat_interleave(device.key_group, dim=-2)
        else:
            s_c = c["vc_scale"].float().repeat_interleave(min(cold.value_group, D), dim=-1)
            s_d = warm["v_scale"].float().repeat_interleave(min(device.value_group, D), dim=-1)
        out[side] = (x, w, s_c / 2 + (x.abs() + s_c) * 2**-9 + 1e-6, s_d / 2 + x.abs() * 2**-9 + 1e-6)
    return out


def test_error_bound_elementwise():
    cold = QuantConfig.parse("int:k3v2:g64:gv8:s2")
    region = _region(_cache().layers[0])
    c = cold_state(region, DEVICE, cold, 0, D)
    warm = warm_state(c, DEVICE, cold, 0, D)
    for side, (x, w, bc, bd) in _bounds(region, cold, c, warm).items():
        err = (x - w).abs()
        kept, rest = err[..., :2, :], err[..., 2:, :]
        assert bool((kept <= bd[..., :2, :]).all()), side
        assert bool((rest <= (bc + bd)[..., 2:, :]).all()), (side, float((rest - (bc + bd)[..., 2:, :]).max()))
        assert float(rest.max()) > float(bd[..., 2:, :].min())  # the cold term is really used (lossy)


def test_error_bound_rotated_values_per_token():
    cold = QuantConfig.parse("int:k3v2:g64:gv16:hadv")
    region = _region(_cache().layers[0])
    c = cold_state(region, DEVICE, cold, 0, D)
    warm = warm_state(c, DEVICE, cold, 0, D)
    x, w, bc, bd = _bounds(region, cold, c, warm)["v"]
    err = (x - w).norm(dim=-1)
    assert bool((err <= bc.norm(dim=-1) + bd.norm(dim=-1)).all())


def test_error_bound_prerope_keys_per_rope_pair(rope):
    cold = QuantConfig.parse("int:k2v2:g64:gv16:s1:prerope")
    region = _region(_cache().layers[1])
    c = cold_state(region, DEVICE, cold, 1, D, rope=rope)
    warm = warm_state(c, DEVICE, cold, 1, D, rope=rope)
    x, w, bc, bd = _bounds(region, cold, c, warm)["k"]
    pair = lambda t: (t[..., : D // 2] ** 2 + t[..., D // 2:] ** 2).sqrt()  # noqa: E731
    err = pair(x - w)[..., 1:, :]
    assert bool((err <= (pair(bc) + pair(bd))[..., 1:, :] * 1.001).all())
    # without RoPE undone at the right positions the keys would not come back within the bound
    shifted = warm_state(c, DEVICE, cold, 1, D, position=5, rope=rope)
    _, w5, _, _ = _bounds(region, cold, c, shifted)["k"]
    assert not bool((pair(x - w5)[..., 1:, :] <= (pair(bc) + pair(bd))[..., 1:, :]).all())


def test_grid_quantize_bound_and_codes():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 3, 64, 16, generator=g)
    x[..., 3] *= 40  # a wide channel
    x[..., 5] = 0.25  # a constant channel
    x[1, 2] = 0.0  # an all-zero head
    codes, step, base = grid_quantize(x, 3)
    assert codes.dtype == torch.uint8 and step.dtype == torch.float16 and base.dtype == torch.int16
    assert step.shape == (2, 3, 1, 1) and base.shape == (2, 3, 1, 16) and int(codes.max()) <= 254
    y = grid_dequantize(codes, step, base)
    assert bool(((x - y).abs() <= step.float() / 2 * (1 + 2**-8) + 1e-6).all())
    levels = codes.amax(-2)[0, 0]  # one step for all channels: the wide channel gets far more levels
    assert int(levels[3]) > 8 * int(levels[0]) and int(levels[5]) == 0


def test_more_cold_bits_less_error():
    region = _region(_cache().layers[0])
    errs = []
    for spec in ("int2:g64:gv16", "int3:g64:gv16", "int4:g64:gv16"):
        cold = QuantConfig.parse(spec)
        warm = warm_state(cold_state(region, DEVICE, cold, 0, D), DEVICE, cold, 0, D)
        errs.append([float((_read(region, s) - _read(warm, s)).abs().mean()) for s in "kv"])
    assert errs[0][0] > errs[1][0] > errs[2][0] and errs[0][1] > errs[1][1] > errs[2][1]


def test_cold_resume_on_a_model(model, rope):
    ids = torch.randint(0, 64, (1, 180), generator=torch.Generator().manual_seed(4))
    device = QuantConfig.parse("int4:k8v4:g32:r32")
    logits = {}
    for spec in ("", "int8:g64:s1", "int:k2v2:g64:s1:prerope"):
        cache = QuantizedKVCache.for_model(model, device)
        with torch.inference_mode():
            model(input_ids=ids[:, :160], past_key_values=cache, use_cache=True)
            if spec:
                apply_cold(cache, QuantConfig.parse(spec), rope=rope)
            logits[spec] = model(input_ids=ids[:, 160:], past_key_values=cache, use_cache=True).logits.float()
    assert all(torch.isfinite(t).all() for t in logits.values())
    near = (logits["int8:g64:s1"] - logits[""]).abs().max()
    far = (logits["int:k2v2:g64:s1:prerope"] - logits[""]).abs().max()
    assert 0 < near < far and near < 0.02 * logits[""].abs().max()


@pytest.mark.parametrize("device,cold,match", [
    ("int4:g32:gv16:r16:prerope", "int2:g64", "prerope"),
    ("int4:g32:gv16:r16:out0.01", "int2:g64", "outliers"),
    ("int4:g32:gv16:r16:ev0.25", "int2:g64", "eviction"),
    ("int4:g32:gv16:r16", "int2:g64:out0.01", "outliers"),
    ("int4:g32:gv16:r16", "int2:g64:ev0.3", "eviction"),
    ("int4:g32:gv16:r16", "int2:g64:had:hadattn", "hadattn"),
    ("int4:g32:gv16:r16", "int2:g48", "multiple of the device key group"),
    ("int4:g32:gv16:r16", "int2:g64:s64", "fewer than the cold key group"),
])
def test_unsupported_specs_raise(device, cold, match):
    d, c = QuantConfig.parse(device), QuantConfig.parse(cold)
    with pytest.raises(ColdSpecError, match=match):
        check_specs(d, c)
    with pytest.raises(ValueError, match=match):  # ColdSpecError is a ValueError, raised before any work
        cold_state({}, d, c, 0, D)


def test_rotated_device_spec_round_trips_per_token():
    """A device spec with rotated values and attention in the rotated basis (hadv:hadattn): cold mode reads
    its region back to the original basis and re-seals it rotated; deterministic, blockwise == region-wide,
    the device format kept, and each value token within the cold + device bounds in L2 norm."""
    device = QuantConfig.parse("int4:k8v4:g32:gv16:r16:s4:hadv:hadattn")
    cold = QuantConfig.parse("int:k3v2:g64:gv16:s1:hadv")
    torch.manual_seed(3)
    cache = QuantizedKVCache(device, 1)
    k, v = torch.randn(1, 2, 200, D) * 2, torch.randn(1, 2, 200, D)
    cache.update(k, v, 0)
    region = _region(cache.layers[0])
    c = cold_state(region, device, cold, 0, D, position=4)
    assert _equal(c, cold_state(region, device, cold, 0, D, position=4))
    warm = warm_state(c, device, cold, 0, D, position=4)
    assert {n: (t.shape, t.dtype) for n, t in warm.items()} == {n: (t.shape, t.dtype) for n, t in region.items()}
    n = region["v_codes"].shape[-2]
    parts = [cold_state(_block(region, a, min(a + 64, n), device), device, cold, 0, D, start=a, position=4 + a)
             for a in range(0, n, 64)]
    assert _equal(concat_cold(parts), c)
    assert cache.layers[0].plan("v").rotate
    x, w, bc, bd = _bounds(region, cold, c, warm, device)["v"]
    assert bool(((x - w).norm(dim=-1) <= bc.norm(dim=-1) + bd.norm(dim=-1)).all())


def test_bad_arguments_raise():
    cache = _cache()
    region = _region(cache.layers[0])
    with pytest.raises(ColdSpecError, match="needs the model's RoPE"):
        cold_state(region, DEVICE, QuantConfig.parse("int2:g64:prerope"), 0, D)
    with pytest.raises(ColdSpecError, match="needs the model's RoPE"):
        apply_cold(cache, QuantConfig.parse("int2:g64:prerope"))
    with pytest.raises(ColdSpecError, match="start=32 must be a multiple"):
        cold_state(_block(region, 32, 96), DEVICE, QuantConfig.parse("int2:g64"), 0, D, start=32)
    with pytest.raises(ColdSpecError, match="does not divide head_dim"):
        cold_state(region, DEVICE, QuantConfig.parse("int2:g64:gv12"), 0, D)
    with pytest.raises(ColdSpecError, match="sets bits for 3 layers"):
        apply_cold(cache, QuantConfig.parse("int:g64:lb222222"))
    untouched = {n: t.clone() for n, t in cache.layers[0].sealed.items()}
    del cache.layers[1].sealed["v_scale"]  # layer 1 cannot be read: layer 0 must not have been rewritten
    with pytest.raises(KeyError):
        apply_cold(cache, QuantConfig.parse("int2:g64:gv16"))
    assert _equal(untouched, cache.layers[0].sealed)


def test_cold_coding_is_smaller_than_the_device_region():
    from services.eval.cold import encoded_bits

    region = _region(_cache().layers[0])
    c = cold_state(region, DEVICE, QuantConfig.parse("int:k3v2:g64:gv16:s1"), 0, D)
    cold_bits = encoded_bits([(f"0.{n}", t.numpy()) for n, t in c.items()], DEVICE.spec())
    dev_bits = encoded_bits([(f"0.{n}", t.numpy()) for n, t in region.items()], DEVICE.spec())
    assert cold_bits < 0.7 * dev_bits


def test_cold_window_rounds_to_its_step_keeps_the_ends_and_is_idempotent():
    codes = torch.arange(-127, 128, dtype=torch.int8)
    assert torch.equal(cold_window(codes, 8), codes)
    for bits in range(2, 8):
        step = 1 << (8 - bits)
        once = cold_window(codes, bits)
        assert once.dtype == torch.int8
        assert torch.equal(cold_window(once, bits), once)  # stored again after a resume: nothing changes
        assert int((once.int() - codes.int()).abs().max()) <= step // 2  # at most half a step
        inner = once[(once.abs() < 127)]
        assert torch.equal(inner % step, torch.zeros_like(inner))  # on the grid, but for the ±127 ends
        assert int(once[0]) == -127 and int(once[-1]) == 127  # the absmax element keeps its end code


def test_cold_sinks_round_fp32_to_bf16_once_and_keep_16_bit_sinks():
    x = torch.randn(1, 3, 4, 16) * 40
    once = cold_sinks(x)
    assert once.dtype == torch.float32 and torch.equal(cold_sinks(once), once)
    assert float(((once - x).abs() / x.abs()).max()) <= 2 ** -8
    for dtype in (torch.bfloat16, torch.float16):
        assert torch.equal(cold_sinks(x.to(dtype)), x.to(dtype))


def test_apply_cold_keeps_an_int8_window_at_the_cw_bits_per_side():
    device = QuantConfig.parse("int4:k8v4:g32:gv16:r24:w8:s4")
    cache = _cache(device, n=230)
    before = [{n: t.clone() for n, t in layer.tensors().items()} for layer in cache.layers]
    cold = QuantConfig.parse("int:k3v2:g64:gv16:s1:cw53")
    assert cold.cold_window_bits == (5, 3) and QuantConfig.parse(cold.spec()) == cold
    apply_cold(cache, cold)
    for i, layer in enumerate(cache.layers):
        after = layer.tensors()
        assert torch.equal(after["k_win"], cold_window(before[i]["k_win"], 5))
        assert torch.equal(after["v_win"], cold_window(before[i]["v_win"], 3))
        assert not torch.equal(after["k_win"], before[i]["k_win"])
        for name in ("k_win_scale", "v_win_scale"):
            assert torch.equal(after[name], before[i][name])
    with pytest.raises(ColdSpecError, match="cold-spec knob"):
        apply_cold(_cache(QuantConfig.parse("int4:k8v4:g32:gv16:r24:w8:s4:cw53"), n=64), cold)
