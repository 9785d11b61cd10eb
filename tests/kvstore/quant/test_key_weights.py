"""Query-weighted cold keys (kvstore/quant/key_weights.py and `qk` in kvstore/quant/cold.py): the weights are
exact powers of two shared by RoPE pairs, deterministic for a model; cold keys with them stay deterministic and
blockwise-invariant, come back in the device format within the weighted bound, and spend their precision
where the queries look."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from kvstore.config import QuantConfig
from kvstore.quant.cache import QuantizedKVCache
from kvstore.quant.cold import ColdSpecError, apply_cold, check_specs, cold_state, concat_cold, warm_state
from kvstore.quant.key_weights import (
    MAX_EXP,
    KeyWeightsUnavailable,
    key_exponents,
    key_weights,
    pow2,
    query_energy,
)
from kvstore.quant.layer import QuantizedKVLayer

DEVICE = QuantConfig.parse("int4:k8v4:g32:gv16:r16")
COLD = QuantConfig.parse("int:k3v2:g64:gv16:s1:qk")
B, H, D = 1, 2, 16


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2)  # head_dim 16, two query heads per kv head
    return LlamaForCausalLM(cfg).eval()


def _region(seed=0, n=200):
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(B, H, n, D, generator=g) * torch.linspace(0.5, 2.0, D)
    layer = QuantizedKVLayer(DEVICE, 0)
    layer.update(k, torch.randn(B, H, n, D, generator=g))
    return {n: t for n, t in layer.sealed.items() if not n.endswith("_sink")}


def _keys(tensors):
    return (tensors["k_codes"], tensors["k_scale"], tensors["k_zero"])


def _read_keys(tensors):
    layer = QuantizedKVLayer(DEVICE, 0)
    layer.head_dim = D
    from kvstore.quant import side as sides

    return sides.read({n[2:]: t for n, t in tensors.items() if n.startswith("k_")}, layer.plan("k"), D)


def test_pow2_is_exact():
    e = torch.arange(-MAX_EXP, MAX_EXP + 1, dtype=torch.int8)
    assert torch.equal(pow2(e), torch.tensor([2.0**i for i in range(-MAX_EXP, MAX_EXP + 1)]))


def test_exponents_follow_query_energy_per_rope_pair():
    energy = torch.ones(1, 4, D, dtype=torch.float64)
    energy[0, :2, 3] = 4.0**4  # kv head 0 (query heads 0 and 1): channel 3 has 256x the energy
    energy[0, 2:, [5, 5 + D // 2]] = 1e-12  # kv head 1: the RoPE pair of channel 5 almost none
    exps = key_exponents(energy, kv_heads=2, alpha=1.0)
    assert exps.dtype == torch.int8 and exps.shape == (1, 2, D)
    assert torch.equal(exps[..., : D // 2], exps[..., D // 2:])  # RoPE pairs (c, c + D/2) share a weight
    assert int(exps[0, 0, 3]) > int(exps[0, 0, 0]) and int(exps[0, 1, 5]) < int(exps[0, 1, 0])
    assert int(exps.abs().max()) == MAX_EXP  # clamped
    flat = key_exponents(torch.ones(2, 4, D), kv_heads=2)
    assert not flat.any()  # equal energies: every weight 1
    with pytest.raises(KeyWeightsUnavailable):
        key_exponents(torch.ones(1, 3, D), kv_heads=2)


def test_query_energy_is_deterministic_and_leaves_no_hooks(model):
    e1 = query_energy(model, D, tokens=64)
    assert e1.shape == (2, 4, D) and bool((e1 > 0).all())
    assert torch.equal(e1, query_energy(model, D, tokens=64))
    assert all(not lay.self_attn.q_proj._forward_hooks for lay in model.model.layers)
    exps = key_weights(model, 2, D)
    assert exps.shape == (2, 2, D) and torch.equal(exps, key_weights(model, 2, D))
    with pytest.raises(KeyWeightsUnavailable):
        query_energy(torch.nn.Linear(2, 2), D)


def test_qk_needs_weights_and_is_a_cold_knob_only():
    region = _region()
    with pytest.raises(ColdSpecError, match="key weights"):
        cold_state(region, DEVICE, COLD, 0, D)
    with pytest.raises(ColdSpecError, match="qk"):
        check_specs(QuantConfig.parse("int4:k8v4:g32:gv16:r16:qk"), COLD)
    with pytest.raises(ColdSpecError, match="rotation"):
        check_specs(DEVICE, QuantConfig.parse("int:k3v2:g64:gv16:hadk:qk"))


def test_qk_cold_keys_are_blockwise_invariant_and_come_back_in_the_device_format():
    region = _region()
    exps = torch.tensor([[3] * (D // 2) + [-2] * (D // 2), [0] * D], dtype=torch.int8)
    whole = cold_state(region, DEVICE, COLD, 0, D, key_exps=exps)
    n = region["v_codes"].shape[-2]
    assert whole["kc_wexp"].shape == (B, H, D, -(-n // 64)) and whole["kc_wexp"].dtype == torch.int8
    assert torch.equal(whole["kc_wexp"][..., 0], exps[None].expand(B, H, D))
    g = DEVICE.key_group
    parts = [cold_state({k: t[..., a // g:min(a + 64, n) // g, :] if k in ("k_scale", "k_zero") else t[..., a:a + 64, :]
                         for k, t in region.items()}, DEVICE, COLD, 0, D, start=a, key_exps=exps)
             for a in range(0, n, 64)]
    joined = concat_cold(parts)
    assert joined.keys() == whole.keys() and all(torch.equal(joined[k], whole[k]) for k in whole)
    warm = warm_state(whole, DEVICE, COLD, 0, D)  # decoding reads the weights from the cold tensors
    assert {k: (t.shape, t.dtype) for k, t in warm.items()} == {k: (t.shape, t.dtype) for k, t in region.items()}
    assert all(torch.equal(a, b) for a, b in zip(_keys(warm), _keys(warm_state(whole, DEVICE, COLD, 0, D))))


def test_weighted_channels_get_finer_steps_within_the_weighted_bound():
    region = _region(seed=1)
    x = _read_keys(region)
    flat = cold_state(region, DEVICE, COLD, 0, D, key_exps=torch.zeros(H, D, dtype=torch.int8))
    exps = torch.zeros(H, D, dtype=torch.int8)
    exps[:, [2, 2 + D // 2]] = 3  # one RoPE pair weighted 8x
    weighted = cold_state(region, DEVICE, COLD, 0, D, key_exps=exps)
    errs = {}
    for name, c in (("flat", flat), ("weighted", weighted)):
        w = _read_keys(warm_state(c, DEVICE, COLD, 0, D))
        err = (x - w).abs()[..., 1:, :]  # the kept first token aside
        step = c["kc_step"].float().transpose(-1, -2).repeat_interleave(64, -2)[..., : x.shape[-2], :]
        scale = pow2(-c["kc_wexp"].transpose(-1, -2).to(torch.int32)).repeat_interleave(64, -2)[..., : x.shape[-2], :]
        s_d = _keys(warm_state(c, DEVICE, COLD, 0, D))[1].float().repeat_interleave(DEVICE.key_group, -2)
        bound = (step * scale)[..., 1:, :] / 2 + s_d[..., 1:, :] / 2 + (x.abs()[..., 1:, :] + step[..., 1:, :]) * 2**-9 + 1e-6
        assert bool((err <= bound).all()), name
        errs[name] = err
    pair = [2, 2 + D // 2]
    rest = [c for c in range(D) if c not in pair]
    assert float(errs["weighted"][..., pair].mean()) < 0.5 * float(errs["flat"][..., pair].mean())
    assert float(errs["weighted"][..., rest].mean()) > float(errs["flat"][..., rest].mean())


def test_apply_cold_with_model_weights(model):
    exps = key_weights(model, 2, D)
    ids = torch.randint(0, 64, (1, 180), generator=torch.Generator().manual_seed(4))
    logits = {}
    for cold in (None, COLD):
        cache = QuantizedKVCache.for_model(model, DEVICE)
        with torch.inference_mode():
            model(input_ids=ids[:, :160], past_key_values=cache, use_cache=True)
            if cold is not None:
                with pytest.raises(ColdSpecError, match="key weights"):
                    apply_cold(cache, cold)
                apply_cold(cache, cold, key_exps=exps)
            logits[cold] = model(input_ids=ids[:, 160:], past_key_values=cache, use_cache=True).logits.float()
    diff = (logits[COLD] - logits[None]).abs().max()
    assert 0 < diff < 0.1 * logits[None].abs().max()
