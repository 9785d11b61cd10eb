import pytest
import torch

from kvstore.config import QuantConfig
from kvstore.quant.attention import active, install
from kvstore.quant.cache import QuantizedKVCache, UnsupportedModelError
from kvstore.quant.evict import Evictor
from tests.kvstore.quant.test_architectures import _model


def test_decide_drops_the_least_attended_of_each_block_beyond_the_window():
    ev = Evictor(rate=0.5, residual=4, block=4)
    ev.append(0, 11, 0, "cpu")
    ev.imp += torch.tensor([5, 1, 3, 0, 9, 9, 0, 0, 7, 7, 7.0])
    decided, drop = ev.decide()
    assert decided == 4  # 11 unjudged, 4 stay in the window, one whole block of 4 is judged
    assert drop.tolist() == [1, 3]  # the two smallest of [5, 1, 3, 0]
    assert ev.imp.tolist() == [9, 9, 0, 0, 7, 7, 7]
    assert Evictor(rate=0.5, residual=8, block=4).decide() == (0, None)


def _run(model, spec, ids, chunks):
    cache = QuantizedKVCache.for_model(model, QuantConfig.parse(spec))
    outs, start = [], 0
    with torch.inference_mode(), active(cache):
        for n in chunks:
            outs.append(model(input_ids=ids[:, start:start + n], past_key_values=cache, use_cache=True).logits)
            start += n
    return cache, outs


@pytest.mark.parametrize("spec", ["int4:g16:gv16:r16:ev0.5", "int:k16v16:g16:r16:s4:ev0.25"])
def test_counts_window_and_sinks_survive(spec):
    model = _model("llama")
    install(model)
    ids = torch.randint(0, 101, (1, 150), generator=torch.Generator().manual_seed(6))
    cache, _ = _run(model, spec, ids, [30] + [1] * 50 + [70])
    q = cache.quant
    k = round(q.evict * q.key_group)
    for layer in cache.layers:
        judged = layer.n_sealed + layer.n_staged + layer.n_evicted
        assert judged % q.key_group == 0 and layer.n_evicted == judged // q.key_group * k
        assert layer.num_tokens == 150 and layer.stored_tokens == 150 - layer.n_evicted
        assert cache.get_seq_length() == 150  # positions, not entries
        assert layer.keys.shape[-2] - layer.n_staged >= q.residual  # the recent window is whole
    assert cache.layers[0].n_sink == q.sinks


def test_export_import_continues_bit_identically_after_eviction():
    model = _model("llama")
    install(model)
    ids = torch.randint(0, 101, (1, 120), generator=torch.Generator().manual_seed(7))
    a, _ = _run(model, "int4:g16:gv16:r16:ev0.5", ids[:, :100], [60] + [1] * 40)
    b = QuantizedKVCache.from_state(a.export_state())
    assert b.export_state().equals(a.export_state())
    with torch.inference_mode():
        for t in range(100, 120):
            with active(a):
                la = model(input_ids=ids[:, t:t + 1], past_key_values=a, use_cache=True).logits
            with active(b):
                lb = model(input_ids=ids[:, t:t + 1], past_key_values=b, use_cache=True).logits
            assert torch.equal(la, lb)
    assert a.layers[0].n_evicted > 0 and a.export_state().equals(b.export_state())


def test_masks_stay_causal_after_eviction():
    """A chunk fed at once gives the logits of its tokens fed one by one (no judging in between)."""
    model = _model("llama")
    install(model)
    ids = torch.randint(0, 101, (1, 106), generator=torch.Generator().manual_seed(8))
    spec = "int:k16v16:g16:r32:ev0.5"
    one, _ = _run(model, spec, ids[:, :100], [100])
    assert one.layers[0].n_evicted > 0 and one.evictor.undecided + 6 < 32 + 16  # no decision within 6 tokens
    state = one.export_state()
    chunk = QuantizedKVCache.from_state(state)
    with torch.inference_mode():
        with active(chunk):
            together = model(input_ids=ids[:, 100:106], past_key_values=chunk, use_cache=True).logits[0]
        single = QuantizedKVCache.from_state(state)
        rows = []
        for t in range(100, 106):
            with active(single):
                rows.append(model(input_ids=ids[:, t:t + 1], past_key_values=single, use_cache=True).logits[0, -1])
    assert torch.allclose(together, torch.stack(rows), atol=1e-5)


def test_eviction_is_refused_with_sliding_layers_and_prerope():
    with pytest.raises(UnsupportedModelError, match="sliding"):
        QuantizedKVCache.for_model(_model("gemma3"), QuantConfig.parse("int4:ev0.5"))
    with pytest.raises(ValueError, match="prerope"):
        QuantConfig.parse("int4:ev0.5:prerope")
