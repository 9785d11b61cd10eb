import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, Qwen3NextConfig

from kvstore.config import QuantConfig
from kvstore.quant.cache import QuantizedKVCache, UnsupportedModelError, check_model_supported

B, H, D = 1, 2, 16


def _kv(n, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, H, n, D, generator=g), torch.randn(B, H, n, D, generator=g)


def _feed(cache, k, v, chunks):
    start = 0
    outs = []
    for n in chunks:
        outs.append(cache.update(k[:, :, start:start + n], v[:, :, start:start + n], 0))
        start += n
    return outs


@pytest.mark.parametrize("spec", ["int4:g32:gv16:r40", "int8:k8v4:g32:gv8:r0", "int2:g32:gv16:r64", "int3:g32:gv16:r33",
                                  "int2:g32:gv16:r20:had:clipv"])
def test_sealing_is_chunking_invariant(spec):
    q = QuantConfig.parse(spec)
    k, v = _kv(150, 1)
    states = []
    for chunks in ([150], [1] * 150, [7, 60, 1, 1, 81], [33, 33, 33, 51]):
        c = QuantizedKVCache(q, 1)
        _feed(c, k, v, chunks)
        layer = c.layers[0]
        assert layer.num_tokens == 150
        assert layer.n_sealed == max(0, 150 - q.residual) // q.key_group * q.key_group
        states.append(c.export_state())
    assert all(s.equals(states[0]) for s in states[1:])


def test_update_returns_window_exactly_and_sealed_within_bound():
    q = QuantConfig.parse("int4:g32:gv16:r16")
    k, v = _kv(80, 2)
    c = QuantizedKVCache(q, 1)
    keys, values = _feed(c, k, v, [80])[0]
    assert keys.shape == k.shape
    n_sealed = c.layers[0].n_sealed
    assert n_sealed == 64
    assert torch.equal(keys[:, :, n_sealed:], k[:, :, n_sealed:])  # window is exact
    assert torch.equal(values[:, :, n_sealed:], v[:, :, n_sealed:])
    # sealed keys: per-channel groups of 32 tokens; bound scale/2 + |x| 2^-10 with scale <= range/15
    rng = k[:, :, :64].reshape(B, H, 2, 32, D)
    scale = (rng.amax(3) - rng.amin(3)) / 15
    bound = scale.repeat_interleave(32, dim=2) * 0.5 * 1.01 + k[:, :, :64].abs() * 2**-10 + 1e-6
    assert bool(((keys[:, :, :64] - k[:, :, :64]).abs() <= bound).all())


def test_export_import_is_bit_exact_and_continues_identically():
    q = QuantConfig.parse("int4:k8v4:g32:gv16:r32")
    k, v = _kv(140, 3)
    a = QuantizedKVCache(q, 2)
    for layer in range(2):
        a.update(k[:, :, :100], v[:, :, :100], layer)
    state = a.export_state()
    b = QuantizedKVCache.from_state(state)
    assert b.export_state().equals(state)
    for layer in range(2):
        ka, va = a.update(k[:, :, 100:], v[:, :, 100:], layer)
        kb, vb = b.update(k[:, :, 100:], v[:, :, 100:], layer)
        assert torch.equal(ka, kb) and torch.equal(va, vb)


def test_device_bytes_are_measured_and_shrink_with_bits():
    k, v = _kv(512, 4)
    sizes = {}
    for spec in ("fp", "int8:g32:gv16:r0", "int4:g32:gv16:r0", "int2:g32:gv16:r0"):
        c = QuantizedKVCache(QuantConfig.parse(spec), 1)
        _feed(c, k, v, [512])
        c.drop_views()  # the call is over: what the cache holds between calls
        sizes[spec] = c.device_bytes()
    fp = 2 * B * H * 512 * D * 4  # float32 keys + values
    assert sizes["fp"] == fp
    assert sizes["fp"] > sizes["int8:g32:gv16:r0"] > sizes["int4:g32:gv16:r0"] > sizes["int2:g32:gv16:r0"]
    # int4 codes are half a byte per element plus fp16 scale/zero per group
    codes = 2 * B * H * 512 * D // 2
    meta = B * H * (512 // 32) * D * 4 + B * H * 512 * (D // 16) * 4
    assert sizes["int4:g32:gv16:r0"] == codes + meta


def test_crop_only_inside_window():
    c = QuantizedKVCache(QuantConfig.parse("int4:g32:gv16:r8"), 1)
    k, v = _kv(50, 5)
    _feed(c, k, v, [50])
    c.crop(-2)
    assert c.get_seq_length() == 48
    with pytest.raises(ValueError, match="unsealed"):
        c.crop(-40)


def test_value_group_must_divide_head_dim():
    c = QuantizedKVCache(QuantConfig.parse("int4:gv12:r0"), 1)
    k, v = _kv(40, 6)
    with pytest.raises(ValueError, match="does not divide head_dim"):
        c.update(k, v, 0)


def _tiny_llama():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=512, initializer_range=0.2)
    return LlamaForCausalLM(cfg).eval()


@pytest.mark.parametrize("make", [_tiny_llama, lambda: GPT2LMHeadModel(GPT2Config(
    vocab_size=97, n_embd=64, n_layer=2, n_head=4, n_positions=512)).eval()])
def test_generate_uses_the_cache(make):
    model = make()
    ids = torch.randint(0, 97, (1, 20), generator=torch.Generator().manual_seed(0))
    q = QuantConfig.parse("fp")
    cache = QuantizedKVCache.for_model(model, q)
    out = model.generate(ids, past_key_values=cache, max_new_tokens=30, do_sample=False)
    ref = model.generate(ids, max_new_tokens=30, do_sample=False)
    assert torch.equal(out, ref)  # full precision through our cache == HF's DynamicCache
    assert cache.get_seq_length() == 20 + 30 - 1
    qc = QuantizedKVCache.for_model(model, QuantConfig.parse("int4:g32:gv16:r8"))
    model.generate(ids, past_key_values=qc, max_new_tokens=30, do_sample=False)
    assert qc.layers[0].n_sealed == 32 and qc.state_bytes() < cache.state_bytes()


def test_unsupported_models_are_refused():
    cfg = Qwen3NextConfig(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                          num_attention_heads=4, num_key_value_heads=2)
    with pytest.raises(UnsupportedModelError, match="linear_attention"):
        check_model_supported(cfg)
    assert check_model_supported(_tiny_llama().config) == 2


@pytest.mark.parametrize("spec", ["int4:g32:gv16:r16:s4", "int2:g32:gv16:r0:s5:had", "int4:g32:gv16:r40:s100"])
def test_sinks_stay_exact_and_state_is_chunking_invariant(spec):
    q = QuantConfig.parse(spec)
    assert QuantConfig.parse(q.spec()) == q
    k, v = _kv(150, 7)
    states = []
    for chunks in ([150], [1] * 150, [3, 2, 90, 55]):
        c = QuantizedKVCache(q, 1)
        keys, values = _feed(c, k, v, chunks)[-1]
        layer = c.layers[0]
        s = min(150, q.sinks)
        assert layer.n_sink == s
        assert layer.n_sealed == max(0, 150 - s - q.residual) // q.key_group * q.key_group
        assert torch.equal(keys[:, :, :s], k[:, :, :s]) and torch.equal(values[:, :, :s], v[:, :, :s])
        states.append(c.export_state())
    assert all(st.equals(states[0]) for st in states[1:])
    back = QuantizedKVCache.from_state(states[0])
    assert back.export_state().equals(states[0])
    ka, va = back.update(k[:, :, :3], v[:, :, :3], 0)
    assert ka.shape[-2] == 153
