"""Histories survive Redis losing data or going away: a real Engine (tiny model), real redis-servers."""

import random
import time

from services.runtime.redis_server import RedisServer, free_port
from services.wire import DoneEvent, ErrorEvent, GenerateCall, is_terminal
from tests.services.worker.test_session_store import make_engine, run

rng = random.Random(3)


def _ids(n=90):
    return [rng.randrange(1000, 20000) for _ in range(n)]


def test_flushall_loses_no_session_histories_come_back_from_the_journal(tiny_model_dir, tmp_path):
    with RedisServer(data_dir=str(tmp_path / "r")) as server:
        eng = make_engine(tiny_model_dir, server.url, tiers={"journal_dir": str(tmp_path / "j")})
        try:
            ids = _ids()
            run(eng, "acme", "seed", ids, n=1)  # its prefix goes hot: the sessions below all adopt it
            ref, _ = run(eng, "acme", "ref", ids, n=30)
            first, _ = run(eng, "acme", "cold", ids, n=10)
            eng.evict("acme", "cold").result()
            hot, _ = run(eng, "acme", "hot", ids, n=10)  # still on the device when Redis is wiped
            run(eng, "acme", "gone", ids, n=2)
            assert eng.delete("acme", "gone").result()
            eng.sessions.history.check_epoch([])  # the worker has seen this Redis's epoch
            server.client().flushall()
            assert eng.tier.get_manifest("acme", "cold") is None
            restored = eng.sessions.history.check_epoch(list(eng.sessions.active.values()))
            assert restored >= 2  # the hot session from memory, the cold one (and ref) from the journal
            assert eng.tier.get_manifest("acme", "cold").tokens[:len(ids)] == ids
            assert eng.tier.get_manifest("acme", "gone") is None  # deleted stays deleted
            rest, u = run(eng, "acme", "cold", n=20, create=False)
            assert u.kv_source == "recomputed" and first + rest == ref
            more, u = run(eng, "acme", "hot", n=20, create=False)
            assert u.kv_source == "device" and hot + more == ref
            assert eng.metrics.history_recoveries._value.get() >= 1
        finally:
            eng.close()


def test_a_lost_or_corrupt_manifest_is_found_in_the_journal_on_lookup(tiny_model_dir, tmp_path):
    with RedisServer(data_dir=str(tmp_path / "r")) as server:
        eng = make_engine(tiny_model_dir, server.url, tiers={"journal_dir": str(tmp_path / "j")})
        try:
            ids = _ids()
            run(eng, "acme", "seed", ids, n=1)
            ref, _ = run(eng, "acme", "ref", ids, n=24)
            for sid, damage in (("lost", "delete"), ("bad", "corrupt")):
                first, _ = run(eng, "acme", sid, ids, n=8)
                eng.evict("acme", sid).result()
                key = eng.tier.session_key("acme", sid)
                if damage == "delete":  # e.g. evicted by an allkeys-* policy
                    eng.tier.client.delete(key)
                else:
                    eng.tier.client.hset(key, "m", b"KVST" + b"\x00" * 60)
                rest, u = run(eng, "acme", sid, n=16, create=False)
                assert u.kv_source == "recomputed" and first + rest == ref
        finally:
            eng.close()


def test_redis_unreachable_at_start_then_back(tiny_model_dir, tmp_path):
    port = free_port()
    url = f"redis://127.0.0.1:{port}/0"
    eng = make_engine(tiny_model_dir, url, redis={"socket_timeout_s": 0.5},
                      tiers={"journal_dir": str(tmp_path / "j")})
    try:
        events: list = []
        eng.submit(GenerateCall("acme", "fresh-1", True, {"token_ids": _ids(40)}, 6, fresh=True), events.append)
        while not events or not is_terminal(events[-1]):
            time.sleep(0.01)
        assert isinstance(events[-1], DoneEvent)  # served from the device while Redis is down
        # on the engine thread: the DoneEvent is sent before the engine releases the session
        s = eng.scheduler.call(lambda: eng.sessions.active[("acme", "fresh-1")]).result(timeout=60)
        assert s.dirty
        events = []
        eng.submit(GenerateCall("acme", "chosen-id", True, {"token_ids": [5, 6]}, 2), events.append)
        while not events:
            time.sleep(0.01)
        assert isinstance(events[-1], ErrorEvent) and events[-1].code == "UNAVAILABLE"  # cannot tell it is new
        with RedisServer(port=port, data_dir=str(tmp_path / "r")):
            eng._housekeeping()
            assert not s.dirty and eng.metrics.storage_up._value.get() == 1
            assert eng.tier.get_manifest("acme", "fresh-1").tokens == s.tokens
    finally:
        eng.close()


def test_a_new_namespace_is_not_taken_for_lost_data(tiny_model_dir, redis_server):
    """The worker sets its namespace's epoch at start: sessions stored before the first housekeeping keep
    their stored KV through it (before, the first housekeeping took the missing epoch for a Redis that lost
    its data and rewrote their manifests without it)."""
    eng = make_engine(tiny_model_dir, redis_server.url)
    try:
        assert eng.tier.client.get(eng.sessions.history.epoch_key) is not None
        run(eng, "acme", "s1", _ids(90))
        eng.evict("acme", "s1").result()
        before = eng.tier.get_manifest("acme", "s1")
        assert before.blocks and before.kv_tokens
        eng.scheduler.call(eng._housekeeping).result(timeout=60)
        after = eng.tier.get_manifest("acme", "s1")
        assert after.blocks == before.blocks and after.kv_tokens == before.kv_tokens
        _, usage = run(eng, "acme", "s1", create=False)
        assert usage.kv_source == "restored"
    finally:
        eng.close()
