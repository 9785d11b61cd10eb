"""Every supported architecture runs through `QuantizedKVCache` (tiny random-init configs).

- full precision through our cache gives exactly the tokens HF's DynamicCache gives, including
  sliding-window layers (Gemma-3, Mistral) at sequence lengths past the window, so the masks work;
- quantized caches (post- and pre-RoPE keys) stay within a stated bound of the fp logits.
"""

import pytest
import torch
from transformers import (
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from kvstore.config import QuantConfig
from kvstore.quant.cache import QuantizedKVCache, UnsupportedModelError

COMMON = dict(vocab_size=101, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
              num_attention_heads=4, num_key_value_heads=2)


def _model(arch: str):
    torch.manual_seed(0)
    if arch == "llama":
        m = LlamaForCausalLM(LlamaConfig(**COMMON))
    elif arch == "qwen2":
        m = Qwen2ForCausalLM(Qwen2Config(**COMMON))
    elif arch == "mistral":
        m = MistralForCausalLM(MistralConfig(**COMMON, sliding_window=12))
    elif arch == "gemma3":
        m = Gemma3ForCausalLM(Gemma3TextConfig(**COMMON, head_dim=16, sliding_window=12,
                                               layer_types=["sliding_attention", "sliding_attention", "full_attention"]))
    elif arch == "gpt2":
        m = GPT2LMHeadModel(GPT2Config(vocab_size=101, n_embd=64, n_layer=3, n_head=4, n_positions=256))
    else:
        raise ValueError(arch)
    return m.eval()


ARCHS = ["llama", "qwen2", "mistral", "gemma3", "gpt2"]
ROPE_ARCHS = ["llama", "qwen2", "mistral", "gemma3"]


def _chunked_logits(model, cache, ids, chunks):
    outs, start = [], 0
    with torch.inference_mode():
        for n in chunks:
            x = ids[:, start:start + n]
            outs.append(model(input_ids=x, past_key_values=cache, use_cache=True).logits.float())
            start += n
    return torch.cat(outs, dim=1)


@pytest.mark.parametrize("arch", ARCHS)
def test_full_precision_cache_matches_dynamic_cache(arch):
    model = _model(arch)
    ids = torch.randint(0, 101, (1, 20), generator=torch.Generator().manual_seed(1))
    ref = model.generate(ids, max_new_tokens=40, do_sample=False)  # 60 tokens: 5x the sliding window
    cache = QuantizedKVCache.for_model(model, QuantConfig.parse("fp"))
    out = model.generate(ids, past_key_values=cache, max_new_tokens=40, do_sample=False)
    assert torch.equal(out, ref)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("spec", ["int8:g16:gv16:r4", "int8:g16:gv16:r4:prerope:s2", "int8:g16:gv16:r4:had:out0.02"])
def test_quantized_cache_logits_stay_close(arch, spec):
    """INT8 (all variants) keeps every logit within 2% of the fp logits' largest magnitude."""
    model = _model(arch)
    q = QuantConfig.parse(spec)
    if q.pre_rope and arch not in ROPE_ARCHS:
        with pytest.raises(UnsupportedModelError, match="rotary"):
            QuantizedKVCache.for_model(model, q)
        return
    ids = torch.randint(0, 101, (1, 70), generator=torch.Generator().manual_seed(2))
    chunks = [20, 1, 1, 16, 32]
    ref = _chunked_logits(model, QuantizedKVCache.for_model(model, QuantConfig.parse("fp")), ids, chunks)
    cache = QuantizedKVCache.for_model(model, q)
    got = _chunked_logits(model, cache, ids, chunks)
    assert cache.layers[0].n_sealed == 64
    err = (got - ref).abs().max()
    assert err <= 0.02 * ref.abs().max(), (arch, spec, float(err), float(ref.abs().max()))
    assert not torch.equal(got, ref)  # the sealed region really is quantized
