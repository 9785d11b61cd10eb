"""Batched passes whose rows belong to different caches (kvstore/quant/rows.py), on every supported
architecture (tiny random-init configs, sliding windows shorter than the sessions):

- with full-precision caches a row's logits match the session's own pass within float error, so positions,
  RoPE, sliding masks and absolute position embeddings are right;
- a session's logits and cache bits do not depend on its batch-mates or its slot;
- R recorded steps replayed as one pass of R rows of the session rebuild the same bits.
"""

import random

import pytest
import torch

from kvstore.config import QuantConfig
from kvstore.quant import attention, row_attention
from kvstore.quant import rows as row_batches
from kvstore.quant.cache import QuantizedKVCache
from kvstore.quant.rows import RowBatch, forward_rows
from tests.kvstore.quant.test_architectures import ARCHS, _model


def _own_pass(model, cache, ids):
    with torch.inference_mode(), attention.active(cache):
        return model(input_ids=torch.tensor([ids]), past_key_values=cache, use_cache=True).logits[0, -1].float()


def _bits(cache):
    return [(n, a.tobytes()) for n, a in cache.export_state().tensors]


@pytest.fixture(params=ARCHS)
def model(request):
    m = _model(request.param)
    attention.install(m)
    return m


def _session(model, spec, n, seed):
    g = random.Random(seed)
    c = QuantizedKVCache.for_model(model, QuantConfig.parse(spec))
    _own_pass(model, c, [g.randrange(101) for _ in range(n)])
    return c


def test_a_row_matches_the_sessions_own_pass_in_full_precision(model, kernel_keys):
    for n in (5, 30):  # 30: past the sliding windows of 12
        a, b = _session(model, "fp", n, 1), _session(model, "fp", n, 1)
        mate = _session(model, "fp", 7, 2)
        own = _own_pass(model, a, [42])
        row = forward_rows(model, [(mate, 3), (b, 42), (None, 9)], 4)[1]
        assert torch.allclose(own, row, atol=1e-4, rtol=1e-4), (own - row).abs().max()


ROW_SPECS = ["int4:g8:gv16:r8", "int4:k8v4:g8:r8:s2:hadv", "int4:g8:gv16:r8:w8:s2:hadv:hadattn", "int4:g8:r8:had:hadattn"]


@pytest.fixture(params=[2048, 34, 10, 0, None], ids=["kernel", "crossing", "mixed", "sdpa", "by-row"])
def kernel_keys(request, monkeypatch):
    """Rows attending to at most this many keys go the one-call way, longer ones torch's SDPA way: 2048 (the
    default) every row here; 34 a session of 30 crosses within the replay test; 10 the subject of 30 one way,
    its shorter batch-mates the other; 0 every row the SDPA way. None: the way of devices and dtypes the
    one-call way does not serve (`_attend_by_row`: every row appended and attended by SDPA on its own)."""
    if request.param is None:
        monkeypatch.setattr(row_attention, "serves", lambda x: False)
    else:
        monkeypatch.setattr(row_batches, "ROW_KERNEL_KEYS", request.param)
    return request.param


@pytest.mark.parametrize("spec", ROW_SPECS)
def test_a_rows_bits_do_not_depend_on_batch_mates_or_slot(model, spec, kernel_keys):
    rng = random.Random(3)
    seen = None
    for trial in range(4):
        subject = _session(model, spec, 30, 1)
        # batch-mates of the same spec and of others (rotated and not: rotations are batched over rows)
        mates = [(_session(model, rng.choice(ROW_SPECS), rng.randrange(1, 20), 10 + trial * 5 + j), rng.randrange(101))
                 for j in range(rng.randrange(4))]
        rows = mates[:]
        rows.insert(rng.randrange(len(rows) + 1), (subject, 42))
        slot = next(i for i, r in enumerate(rows) if r[0] is subject)
        got = (forward_rows(model, rows, 8)[slot].numpy().tobytes(), _bits(subject))
        seen = seen or got
        assert got == seen, f"trial {trial}: slot {slot}, {len(rows)} rows"


@pytest.mark.parametrize("spec", ["int4:g8:gv16:r8", "int4:g8:gv16:r8:w8:s2:hadv:hadattn"])
def test_replaying_r_steps_as_one_pass_rebuilds_the_same_bits(model, spec, kernel_keys):
    live, replayed = _session(model, spec, 30, 1), _session(model, spec, 30, 1)
    steps = [11, 12, 13, 14, 15, 16, 17, 18]
    for i, t in enumerate(steps):
        mate = _session(model, "int4:g8:gv16:r8", 3 + i, 50 + i)
        forward_rows(model, [(mate, 1), (live, t)], 8)
    forward_rows(model, [(replayed, t) for t in steps], 8)
    assert _bits(live) == _bits(replayed)


def test_a_row_batch_refuses_rows_it_was_not_built_for(model):
    c = _session(model, "fp", 3, 1)
    with pytest.raises(ValueError):
        forward_rows(model, [(c, 1)] * 3, 2)
    with pytest.raises(ValueError, match="row batch"):
        RowBatch([c]).attend_rows(model.model.layers[0].self_attn if hasattr(model, "model") and hasattr(
            model.model, "layers") else None, torch.zeros(2, 4, 1, 16), torch.zeros(2, 2, 1, 16),
            torch.zeros(2, 2, 1, 16))
