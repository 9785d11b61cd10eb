import pytest
import torch

from kvstore.config import QuantConfig
from kvstore.quant.attention import active, install
from kvstore.quant.cache import QuantizedKVCache
from tests.kvstore.quant.test_architectures import _model


def _probe(arch, spec, n=40, probe=True):
    model = _model(arch)
    install(model)
    cache = QuantizedKVCache.for_model(model, QuantConfig.parse(spec))
    ids = torch.randint(0, 101, (1, n + 1), generator=torch.Generator().manual_seed(5))
    with torch.inference_mode(), active(cache):
        model(input_ids=ids[:, :n], past_key_values=cache, use_cache=True)
        before = cache.export_state()
        cache.probe = [] if probe else None
        model(input_ids=ids[:, n:], past_key_values=cache, use_cache=True)
    return cache, before


@pytest.mark.parametrize("arch", ["llama", "gemma3", "gpt2"])
def test_probe_reports_every_layer_and_grows_with_fewer_bits(arch):
    c8, _ = _probe(arch, "int8:g16:gv16:r32")
    c2, _ = _probe(arch, "int2:g16:gv16:r32")
    assert [p[0] for p in c8.probe] == [0, 1, 2] == [p[0] for p in c2.probe]
    for (_, kl8, e8), (_, kl2, e2) in zip(c8.probe, c2.probe):
        assert 0 < e8 < 0.05 and 0 <= kl8 < 1e-3  # stated bound for INT8 on random weights
        assert e2 > 4 * e8 and kl2 > kl8


def test_probe_leaves_the_cache_untouched_and_skips_prefill():
    cache, before = _probe("llama", "int4:g16:gv16:r32:had:hadattn")
    assert len(cache.probe) == 3
    # the state after a probed step is the state a probe-free run gives
    ref, _ = _probe("llama", "int4:g16:gv16:r32:had:hadattn", probe=False)
    assert ref.probe is None
    assert cache.export_state().equals(ref.export_state())


def test_no_whole_block_in_the_window_means_no_probe():
    cache, _ = _probe("llama", "int4:g16:gv16:r32", n=10)
    assert cache.probe == []
