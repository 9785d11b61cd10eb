import pytest

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


@pytest.mark.parametrize("kw,needle", [
    ({"schedule": [50]}, "covers 50 tokens"),
    ({"kv_tokens": 5}, "not a boundary"),
    ({"schedule": [0, 1], "kv_tokens": 0}, "non-positive"),
    ({"tokens": [-1], "schedule": [], "kv_tokens": 0}, "out of range"),
])
def test_invariants_are_enforced(kw, needle):
    with pytest.raises(ContainerError, match=needle):
        _m(**kw).encode()


def test_decode_rejects_lies_and_other_kinds():
    blob = _m().encode()
    kind, codec, meta, payload = unpack_container(blob)
    for change, needle in (({"n_tokens": 41}, "payload size"), ({"v": 2}, "manifest version"),
                           ({"kv_tokens": 7}, "not a boundary")):
        with pytest.raises(ContainerError, match=needle):
            SessionManifest.decode(pack_container(kind, codec, {**meta, **change}, payload))
    bomb = payload[: 4 * 40] + (1).to_bytes(4, "little") + (2**31).to_bytes(4, "little")
    with pytest.raises(ContainerError, match="inconsistent"):
        SessionManifest.decode(pack_container(kind, codec, {**meta, "n_runs": 1}, bomb))
    with pytest.raises(ContainerError, match="expected a MANIFEST"):
        SessionManifest.decode(pack_container(Kind.KV, Codec.RAW, meta, payload))
