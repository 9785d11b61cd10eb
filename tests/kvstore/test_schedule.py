"""kvstore/schedule.py: the pass encoding round-trips, rows = 1 keeps the pre-batching values, bad entries
are refused, token counts and boundaries read the encoded entries, and packed prefill segments replay
one per pass."""

import pytest

from kvstore.schedule import (
    MAX_PACKED_ROWS,
    MAX_PASS_TOKENS,
    MAX_ROWS,
    PACKED,
    SEAL,
    Pass,
    adopted_schedule,
    boundaries,
    canonical_tokens,
    check_schedule,
    decode_pass,
    encode_pass,
    entry_tokens,
    passes,
    replay_passes,
    schedule_tokens,
)


@pytest.mark.parametrize("p", [Pass(1), Pass(512), Pass(MAX_PASS_TOKENS), Pass(1, 2), Pass(1, 16), Pass(16, 16),
                               Pass(3, MAX_ROWS), Pass(MAX_ROWS, MAX_ROWS), Pass(1, 16, packed=True),
                               Pass(64, 256, packed=True), Pass(512, 512, packed=True), Pass(7, MAX_PACKED_ROWS, packed=True),
                               Pass(MAX_PACKED_ROWS, MAX_PACKED_ROWS, packed=True)])
def test_a_pass_round_trips(p):
    assert decode_pass(encode_pass(p)) == p
    assert entry_tokens(encode_pass(p)) == p.tokens


def test_a_pass_of_its_own_is_its_token_count():
    assert encode_pass(Pass(7)) == 7 and encode_pass(Pass(512, rows=1)) == 512
    assert encode_pass(Pass(1, 16)) != 1 and decode_pass(encode_pass(Pass(1, 16))).batched


def test_a_packed_pass_is_flagged_and_not_a_batched_decode_step():
    e = encode_pass(Pass(64, 256, packed=True))
    assert e & PACKED and entry_tokens(e) == 64 and decode_pass(e) == Pass(64, 256, packed=True)
    assert not decode_pass(e).batched and decode_pass(encode_pass(Pass(1, 16))).batched


@pytest.mark.parametrize("p", [Pass(0), Pass(MAX_PASS_TOKENS + 1), Pass(1, 0), Pass(1, MAX_ROWS + 1), Pass(5, 4),
                               Pass(1, 8, packed=True), Pass(1, 40, packed=True), Pass(33, 32, packed=True),
                               Pass(1, MAX_PACKED_ROWS + 16, packed=True)])
def test_a_pass_that_cannot_be_one_is_refused(p):
    with pytest.raises(ValueError):
        encode_pass(p)


def test_entries_that_encode_no_pass_are_refused():
    assert decode_pass(SEAL) is None
    # 0 tokens; 5 tokens in 4 rows; out of range; a packed pass of no token; 17 tokens in a packed pass of 16
    for bad in (1 << 24, (3 << 24) | 5, -1, 1 << 32, PACKED, PACKED | 17):
        with pytest.raises(ValueError):
            decode_pass(bad)
    with pytest.raises(ValueError, match=r"schedule\[1\]"):
        check_schedule([4, 1 << 24])


def test_tokens_and_boundaries_count_the_tokens_not_the_encoded_values():
    s = [512, 64, encode_pass(Pass(1, 16)), encode_pass(Pass(1, 16)), SEAL, encode_pass(Pass(3, 4)), 1]
    assert schedule_tokens(s) == 512 + 64 + 1 + 1 + 3 + 1
    assert boundaries(s) == [0, 512, 576, 577, 578, 578, 581, 582]


def test_replay_packs_runs_of_batched_steps_up_to_their_row_count():
    b4, b16 = encode_pass(Pass(1, 4)), encode_pass(Pass(1, 16))
    s = [512, 64] + [b4] * 6 + [b16] * 3 + [1, SEAL, b4]
    assert replay_passes(s) == [Pass(512), Pass(64), Pass(4, 4), Pass(2, 4), Pass(3, 16), Pass(1), None, Pass(1, 4)]
    assert replay_passes(s, pack=False) == [decode_pass(e) for e in s]
    assert sum(p.tokens for p in replay_passes(s) if p) == schedule_tokens(s)


def test_packed_segments_replay_one_per_pass_and_never_merge():
    b16, p256, p16 = encode_pass(Pass(1, 16)), encode_pass(Pass(64, 256, packed=True)), encode_pass(Pass(3, 16, packed=True))
    s = [p256, b16, b16, p16, b16, p16, p16]
    assert replay_passes(s) == [Pass(64, 256, True), Pass(2, 16), Pass(3, 16, True), Pass(1, 16), Pass(3, 16, True),
                                Pass(3, 16, True)]
    assert schedule_tokens(s) == 64 + 2 + 3 + 1 + 6


def test_passes_end_at_chunk_multiples():
    assert passes(0, 1100, 512) == [512, 512, 76]
    assert passes(1100, 1200, 512) == [100]
    assert passes(1000, 1600, 512) == [24, 512, 64]
    assert passes(5, 5, 512) == []
    assert sum(passes(3, 5000, 256)) == 4997


def test_canonical_tokens_count_leading_complete_chunks():
    assert canonical_tokens([512, 512, 76, 1, 1], 512) == 1024
    assert canonical_tokens([512, 512, SEAL, 128, 1], 512) == 1024
    assert canonical_tokens([100, 512], 512) == 0
    assert canonical_tokens(adopted_schedule(1536, 512), 512) == 1536
    assert adopted_schedule(1024, 512) == [512, 512, SEAL]
