"""Packed prefill passes: several caches' token runs side by side in one pass (kvstore/quant/segments.py), on
every supported architecture (tiny random-init configs, sliding windows shorter than the segments):

- with full-precision caches a segment's logits match the session's own pass within float error, so
  positions, RoPE, causal and sliding masks and absolute position embeddings are right;
- a segment's logits and cache bits do not depend on the other segments or the rows it sits in (which is
  also what replay does: the segment alone in a pass of the same rows);
- what a packed pass cannot take is refused.
"""

import random

import pytest
import torch

from kvstore.config import QuantConfig
from kvstore.quant import attention
from kvstore.quant.cache import QuantizedKVCache
from kvstore.quant.evict import Evictor
from kvstore.quant.segments import LOGIT_ROWS, causal_mask, forward_segments
from tests.kvstore.quant.test_architectures import ARCHS, _model
from tests.kvstore.quant.test_rows import _bits, _own_pass, _session


@pytest.fixture(params=ARCHS)
def model(request):
    m = _model(request.param)
    attention.install(m)
    return m


def _ids(rng, n):
    return [rng.randrange(101) for _ in range(n)]


def test_a_segment_matches_the_sessions_own_pass_in_full_precision(model):
    rng = random.Random(0)
    for before, n in ((0, 20), (5, 30), (25, 9)):  # 30 tokens: past the sliding windows of 12
        ids = _ids(rng, n)
        own = _session(model, "fp", before, 1) if before else QuantizedKVCache.for_model(model, QuantConfig.parse("fp"))
        packed = _session(model, "fp", before, 1) if before else QuantizedKVCache.for_model(model, QuantConfig.parse("fp"))
        want = _own_pass(model, own, ids)
        mates = [(_session(model, "fp", 4, 2), _ids(rng, 7)), (QuantizedKVCache.for_model(model, QuantConfig.parse("fp")), _ids(rng, 3))]
        got = forward_segments(model, [mates[0], (packed, ids), mates[1]], 64)
        assert got.shape[0] == 3
        assert torch.allclose(want, got[1], atol=1e-4, rtol=1e-4), (want - got[1]).abs().max()
        assert packed.get_seq_length() == before + n == own.get_seq_length()


SPECS = ["int4:g8:gv16:r8", "int4:k8v4:g8:r8:s2:hadv", "int4:g8:gv16:r8:w8:s2:hadv:hadattn", "int4:g8:r8:had:hadattn"]


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("before", [0, 30])  # 0: the segment fills the sinks first
def test_a_segments_bits_do_not_depend_on_the_other_segments_or_its_rows(model, spec, before):
    rng = random.Random(3)
    ids = _ids(random.Random(9), 21)
    seen = None
    for trial in range(4):
        subject = _session(model, spec, before, 1) if before else QuantizedKVCache.for_model(model, QuantConfig.parse(spec))
        segments = [(_session(model, rng.choice(SPECS), rng.randrange(1, 20), 10 + trial * 5 + j), _ids(rng, rng.randrange(1, 12)))
                    for j in range(0 if trial == 0 else rng.randrange(1, 4))]  # trial 0: alone, as replay runs it
        slot = rng.randrange(len(segments) + 1)
        segments.insert(slot, (subject, ids))
        got = (forward_segments(model, segments, 64)[slot].numpy().tobytes(), _bits(subject))
        seen = seen or got
        assert got == seen, f"trial {trial}: slot {slot} of {len(segments)} segments"


def test_a_packed_pass_refuses_what_it_cannot_take(model):
    spec = QuantConfig.parse("int4:g8:gv16:r8")
    c = [QuantizedKVCache.for_model(model, spec) for _ in range(LOGIT_ROWS + 1)]
    with pytest.raises(ValueError, match="segments"):
        forward_segments(model, [(x, [1]) for x in c], 64)
    with pytest.raises(ValueError, match="at most once"):
        forward_segments(model, [(c[0], [1]), (c[0], [2])], 16)
    with pytest.raises(ValueError, match="do not fit"):
        forward_segments(model, [(c[0], [1] * 10), (c[1], [2] * 10)], 16)
    with pytest.raises(ValueError, match="do not fit"):
        forward_segments(model, [(c[0], [])], 16)
    c[2].evictor = Evictor.__new__(Evictor)
    with pytest.raises(ValueError, match="evictor"):
        forward_segments(model, [(c[2], [1])], 16)
    assert all(x.get_seq_length() == 0 for x in c[:2])


def test_the_causal_mask_sees_held_keys_up_to_each_query():
    m = causal_mask(3, 6, 8, 2, None, torch.device("cpu"))[0, 0]  # keys at positions 2..7, queries at 5, 6, 7
    assert m.tolist() == [[True, True, True, True, False, False], [True] * 5 + [False], [True] * 6]
    w = causal_mask(2, 5, 5, 0, 2, torch.device("cpu"))[0, 0]  # window 2: query at 3 sees 2, 3; at 4 sees 3, 4
    assert w.tolist() == [[False, False, True, True, False], [False, False, False, True, True]]
