"""Values in Redis that are not ours — pickles, wrong magic, another model's fingerprint, another format
version — are refused (never executed or unpickled) and the session is rebuilt from its history."""

import pickle
import random

import pytest

from kvstore.codec.container import Kind, pack_container, unpack_container
from tests.services.worker.test_session_store import block_keys, make_engine, run

rng = random.Random(13)


class _Boom:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):  # unpickling this would create the file
        return (open, (self.path, "w"))


def _variants(real: bytes, marker: str) -> dict[str, bytes]:
    kind, codec, meta, payload = unpack_container(real)
    return {
        "pickle": pickle.dumps(_Boom(marker)),
        "magic": b"NOPE" + real[4:],
        "fingerprint": pack_container(kind, codec, {**meta, "fingerprint": "0" * 64}, payload),
        "version": pack_container(kind, codec, {**meta, "v": 99}, payload),
        "kind": pack_container(Kind.BLOCK if kind == Kind.MANIFEST else Kind.MANIFEST, codec, meta, payload),
    }


@pytest.fixture
def engine(tiny_model_dir, redis_server, tmp_path):
    eng = make_engine(tiny_model_dir, redis_server.url, prefix={"enabled": False},
                      tiers={"journal_dir": str(tmp_path / "j")})
    yield eng
    eng.close()


def test_foreign_block_values_are_refused_and_recomputed(engine, tmp_path):
    ids = [rng.randrange(1000, 20000) for _ in range(100)]
    ref, _ = run(engine, "acme", "ref", ids, n=24)
    marker = tmp_path / "unpickled"
    real = None
    for name in ("pickle", "magic", "fingerprint", "version", "kind"):
        first, _ = run(engine, "acme", name, ids, n=8)
        engine.evict("acme", name).result()
        key = block_keys(engine, "acme", name)[0]
        real = real or engine.tier.client.hget(key, "d")
        engine.tier.client.hset(key, "d", _variants(real, str(marker))[name])
        rest, u = run(engine, "acme", name, n=16, create=False)
        assert u.kv_source == "recomputed" and first + rest == ref, name
    assert not marker.exists()


def test_foreign_manifests_are_refused_and_the_journal_is_used(engine, tmp_path):
    ids = [rng.randrange(1000, 20000) for _ in range(60)]
    ref, _ = run(engine, "acme", "mref", ids, n=20)
    marker = tmp_path / "unpickled"
    for name in ("pickle", "magic", "version", "kind"):  # (another model's history is still a history)
        sid = f"m-{name}"
        first, _ = run(engine, "acme", sid, ids, n=8)
        engine.evict("acme", sid).result()
        key = engine.tier.session_key("acme", sid)
        engine.tier.client.hset(key, "m", _variants(engine.tier.client.hget(key, "m"), str(marker))[name])
        rest, u = run(engine, "acme", sid, n=12, create=False)
        assert u.kv_source == "recomputed" and first + rest == ref, name  # history from the journal
        assert engine.tier.get_manifest("acme", sid).tokens[:len(ids)] == ids  # and written back
    assert not marker.exists()
