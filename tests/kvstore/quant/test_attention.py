import pytest
import torch

from kvstore.config import QuantConfig
from kvstore.quant.attention import active, install
from kvstore.quant.cache import QuantizedKVCache
from tests.kvstore.quant.test_architectures import _chunked_logits, _model

CHUNKS = [20, 1, 1, 16, 32]


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gemma3"])
def test_installed_attention_is_sdpa_for_plain_caches(arch):
    """Chunked prefill through the kvstash attention gives SDPA's logits (masks included)."""
    model = _model(arch)
    ids = torch.randint(0, 101, (1, 70), generator=torch.Generator().manual_seed(4))
    ref = _chunked_logits(model, QuantizedKVCache.for_model(model, QuantConfig.parse("fp")), ids, CHUNKS)
    install(model)
    cache = QuantizedKVCache.for_model(model, QuantConfig.parse("fp"))
    with active(cache):
        got = _chunked_logits(model, cache, ids, CHUNKS)
    assert torch.allclose(got, ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("arch,spec", [("llama", "int4:g16:gv16:r4:had"), ("gpt2", "int4:g16:gv16:r4:had"),
                                       ("gemma3", "int3:g16:gv16:r4:hadv:prerope")])
def test_attention_in_rotated_space_equals_rotating_back(arch, spec):
    model = _model(arch)
    install(model)
    ids = torch.randint(0, 101, (1, 70), generator=torch.Generator().manual_seed(3))
    back = QuantizedKVCache.for_model(model, QuantConfig.parse(spec))
    with active(back):
        ref = _chunked_logits(model, back, ids, CHUNKS)
    rotated = QuantizedKVCache.for_model(model, QuantConfig.parse(spec + ":hadattn"))
    assert any(rotated.layers[0].returns_rotated.values())
    with active(rotated):
        got = _chunked_logits(model, rotated, ids, CHUNKS)
    # same quantized codes, only float rounding differs: within 1e-4 of the largest logit
    assert (got - ref).abs().max() <= 1e-4 * ref.abs().max()
    # without the active cache the attention cannot know the basis, and the logits are wrong
    lost = QuantizedKVCache.for_model(model, QuantConfig.parse(spec + ":hadattn"))
    bad = _chunked_logits(model, lost, ids, CHUNKS)
    assert (bad - ref).abs().max() > 1e-2 * ref.abs().max()
