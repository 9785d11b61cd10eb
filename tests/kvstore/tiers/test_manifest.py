import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvstore.codec.container import Codec, ContainerError, Kind, pack_container, unpack_container
from kvstore.tiers.manifest import SessionManifest


def _m(**kw):
    d = dict(tenant="t", session_id="s", tokens=list(range(100, 140)), schedule=[30, 1, 1, 1, 1, 1], kv_tokens=31,
             model_fingerprint="ab" * 32, quant_spec="int:k8v4:g32:gv32:r128", created_at=1.5, updated_at=2.5)
    d.update(kw)
    return SessionManifest(**d)


def test_roundtrip():
    m = _m(tokens=[0, 2**32 - 1] + list(range(50)))
    assert SessionManifest.decode(m.encode()) == m


def test_schedule_is_run_length_encoded():
    long = _m(tokens=list(range(5000)), schedule=[100] + [1] * 4000, kv_tokens=4100)
    _, _, meta, payload = unpack_container(long.encode())
    assert meta["n_runs"] == 2 and len(payload) == 4 * (5000 + 4)
    assert SessionManifest.decode(long.encode()) == long


def test_batched_passes_round_trip_and_count_their_tokens():
    from kvstore.schedule import Pass, encode_pass

    b16, b4 = encode_pass(Pass(1, 16)), encode_pass(Pass(1, 4))
    m = _m(tokens=list(range(200)), schedule=[100] + [b16] * 40 + [b4] * 3 + [1] * 2, kv_tokens=140)
    _, _, meta, _ = unpack_container(m.encode())
    assert meta["n_runs"] == 4  # runs of equal buckets stay compact
    back = SessionManifest.decode(m.encode())
    assert back == m and back.schedule[1] == b16
    with pytest.raises(ContainerError, match="encodes no pass"):
        _m(schedule=[30, (3 << 24) | 5], kv_tokens=30).encode()  # 5 tokens cannot be rows of a 4-row pass
    with pytest.raises(ContainerError, match="covers 41 tokens"):
        _m(schedule=[30] + [b16] * 11, kv_tokens=30).encode()


@pytest.mark.parametrize("kw,needle", [
    ({"schedule": [50]}, "covers 50 tokens"),
    ({"kv_tokens": 5}, "not a boundary"),
    ({"schedule": [-1, 1], "kv_tokens": 0}, "out of range"),
    ({"tokens": [-1], "schedule": [], "kv_tokens": 0}, "out of range"),
])
def test_invariants_are_enforced(kw, needle):
    with pytest.raises(ContainerError, match=needle):
        _m(**kw).encode()


def test_decode_rejects_lies_and_other_kinds():
    blob = _m().encode()
    kind, codec, meta, payload = unpack_container(blob)
    for change, needle in (({"n_tokens": 41}, "payload size"), ({"v": 3}, "manifest version"),
                           ({"kv_tokens": 7}, "not a boundary")):
        with pytest.raises(ContainerError, match=needle):
            SessionManifest.decode(pack_container(kind, codec, {**meta, **change}, payload))
    bomb = payload[: 4 * 40] + (1).to_bytes(4, "little") + (2**31).to_bytes(4, "little")
    with pytest.raises(ContainerError, match="inconsistent"):
        SessionManifest.decode(pack_container(kind, codec, {**meta, "n_runs": 1}, bomb))
    with pytest.raises(ContainerError, match="expected a MANIFEST"):
        SessionManifest.decode(pack_container(Kind.KV, Codec.RAW, meta, payload))


# ---- more invariants, and a property round trip -----------------------------------------------------


def test_stored_kv_may_lag_the_schedule_at_a_pass_boundary():
    for kv in (0, 30, 31, 35):  # 0: no stored KV; 31 < 35: the history moved on after the last offload
        m = _m(kv_tokens=kv)
        assert SessionManifest.decode(m.encode()) == m


def test_decoded_values_are_plain_python():
    m = SessionManifest.decode(_m(tokens=[np.int64(5)] * 40).encode())
    assert all(type(t) is int for t in m.tokens + m.schedule) and type(m.created_at) is float
    assert SessionManifest.decode(_m(created_at=0, updated_at=0).encode()).created_at == 0.0


@pytest.mark.parametrize("kw,needle", [
    ({"tenant": ""}, "tenant must be 1..128"),
    ({"session_id": "a/b"}, "session id must be 1..128"),
    ({"session_id": "x" * 129}, "session id must be 1..128"),
    ({"tokens": [2**32], "schedule": [], "kv_tokens": 0}, "out of range"),
    ({"tokens": [1.0], "schedule": [], "kv_tokens": 0}, "not an int"),
    ({"schedule": [-3], "kv_tokens": 0}, "out of range"),
    ({"kv_tokens": -1}, "kv_tokens=-1"),
    ({"kv_tokens": 36}, "not a boundary"),
    ({"created_at": math.nan}, "finite"),
    ({"updated_at": math.inf}, "finite"),
    ({"quant_spec": None}, "quant_spec must be a str"),
])
def test_more_invariants_are_enforced(kw, needle):
    with pytest.raises(ContainerError, match=needle):
        _m(**kw).encode()
    with pytest.raises(ValueError):  # ContainerError is a ValueError
        _m(**kw).validate()


def test_decode_rejects_corruption_and_bad_headers():
    blob = _m().encode()
    with pytest.raises(ContainerError, match="checksum"):
        SessionManifest.decode(blob[:-1] + bytes([blob[-1] ^ 1]))
    with pytest.raises(ContainerError, match="truncated"):
        SessionManifest.decode(blob[:-4])
    kind, codec, meta, payload = unpack_container(blob)
    with pytest.raises(ContainerError, match="codec must be RAW"):
        SessionManifest.decode(pack_container(kind, Codec.ZSTD, meta, payload))
    for change in ({"tenant": 5}, {"created_at": "now"}, {"n_runs": 1.5}):
        with pytest.raises(ContainerError, match="missing or has a bad field"):
            SessionManifest.decode(pack_container(kind, codec, {**meta, **change}, payload))
    without = {k: v for k, v in meta.items() if k != "quant_spec"}
    with pytest.raises(ContainerError, match="missing or has a bad field"):
        SessionManifest.decode(pack_container(kind, codec, without, payload))
    with pytest.raises(ContainerError, match="tenant must be"):
        SessionManifest.decode(pack_container(kind, codec, {**meta, "tenant": "a b"}, payload))


@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_roundtrip_property(data):
    schedule = data.draw(st.lists(st.integers(1, 5), max_size=30))
    extra = data.draw(st.integers(0, 5))
    tokens = data.draw(st.lists(st.integers(0, 2**32 - 1), min_size=sum(schedule) + extra, max_size=sum(schedule) + extra))
    bounds = [0] + [sum(schedule[:i + 1]) for i in range(len(schedule))]
    m = SessionManifest(tenant=data.draw(st.from_regex(r"[A-Za-z0-9._-]{1,20}", fullmatch=True)), session_id="s-1",
                        tokens=tokens, schedule=schedule, kv_tokens=data.draw(st.sampled_from(bounds)),
                        model_fingerprint=data.draw(st.text(max_size=20)), quant_spec="int4",
                        created_at=data.draw(st.floats(allow_nan=False, allow_infinity=False)), updated_at=1.0)
    assert SessionManifest.decode(m.encode()) == m


def test_pinned_is_durable_and_optional():
    from kvstore.codec.container import unpack_container

    m = SessionManifest("acme", "s1", [1, 2, 3], [3], 3, "fp" * 8, "fp", 1.0, 2.0, pinned=True)
    blob = m.encode()
    assert SessionManifest.decode(blob).pinned is True
    assert unpack_container(blob)[2]["pinned"] is True
    m.pinned = False
    assert "pinned" not in unpack_container(m.encode())[2]  # older readers see the same header as before
    assert SessionManifest.decode(m.encode()).pinned is False


def test_block_records_round_trip_and_seal_markers_are_schedule_entries():
    from kvstore.schedule import SEAL
    from kvstore.tiers.manifest import BlockRef

    refs = [BlockRef(bytes([i]) * 32, bytes([i + 1]) * 32, public=i == 0) for i in range(3)]
    m = _m(schedule=[8, 8, SEAL, 14, 1], kv_tokens=31, blocks=refs)
    back = SessionManifest.decode(m.encode())
    assert back == m and back.blocks[0].public and not back.blocks[1].public
    with pytest.raises(ContainerError, match="kv_tokens is 0"):
        _m(kv_tokens=0, blocks=refs).encode()
    kind, codec, meta, payload = unpack_container(m.encode())
    with pytest.raises(ContainerError, match="payload size"):
        SessionManifest.decode(pack_container(kind, codec, {**meta, "n_blocks": 4}, payload))
    bad = bytearray(payload)
    bad[4 * 40 + 8 * meta["n_runs"]] = 7  # unknown flags in the first block record
    with pytest.raises(ContainerError, match="unknown flags"):
        SessionManifest.decode(pack_container(kind, codec, meta, bytes(bad)))


def test_only_the_current_record_version_is_read():
    """Version 1 (no block records) was dropped before the first release: refused, like any other."""
    kind, codec, meta, payload = unpack_container(_m().encode())
    for v in (1, 3):
        with pytest.raises(ContainerError, match="unsupported manifest version"):
            SessionManifest.decode(pack_container(kind, codec, meta | {"v": v}, payload))
    with pytest.raises(ContainerError, match="n_blocks"):
        SessionManifest.decode(pack_container(kind, codec, {k: x for k, x in meta.items() if k != "n_blocks"},
                                              payload))
