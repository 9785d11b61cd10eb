"""A call is atomic: one cut short (cancelled, past its deadline, its worker gone) leaves no trace, whatever
the worker wrote meanwhile. A real Engine (tiny model) and real redis-servers; every continuation is checked
token for token against a session that was never interrupted."""

import random
import time

import pytest

from services.runtime.redis_server import RedisServer
from services.wire import ErrorEvent, GenerateCall, TokensEvent
from tests.services.worker.test_session_store import call_events, make_engine, run

rng = random.Random(11)
IDS = [rng.randrange(1000, 20000) for _ in range(90)]


def _start_long_call(eng, sid: str, create: bool = False, ids=None) -> tuple[int, list]:
    """Submit a 4000-token call and wait until it has streamed three tokens; (task id, its events)."""
    events: list = []
    tid = eng.submit(GenerateCall("acme", sid, create, {"token_ids": ids} if ids else None, 4000), events.append)
    deadline = time.monotonic() + 60
    while sum(isinstance(e, TokensEvent) for e in events) < 3:
        assert time.monotonic() < deadline and not any(isinstance(e, ErrorEvent) for e in events), events[-1:]
        time.sleep(0.002)
    return tid, events


def _cancel(eng, tid: int) -> None:
    eng.scheduler.cancel(tid)
    eng.scheduler.call(lambda: None).result(timeout=30)  # the inbox is FIFO: the cancel has been handled


def _outcome(eng, sid: str, n: int = 1, ids=None, **call) -> dict:
    """The last event of a call: its `done` or its `error`."""
    return call_events(eng, GenerateCall("acme", sid, False, {"token_ids": ids} if ids else None, n, **call))[-1]


def _seeded(eng):
    """The engine, once a first session has made IDS's prefix hot: every later session adopts it alike."""
    run(eng, "acme", "seed", IDS, n=1)
    return eng


@pytest.fixture
def engine(tiny_model_dir, redis_server, tmp_path):
    eng = _seeded(make_engine(tiny_model_dir, redis_server.url, tiers={"journal_dir": str(tmp_path / "j")}))
    yield eng
    eng.close()


@pytest.mark.parametrize("cut", ["cancel", "deadline"])
def test_a_call_cut_short_leaves_no_trace_and_the_session_goes_on_exactly(engine, cut):
    ref, _ = run(engine, "acme", "ref", IDS, n=30)
    first, _ = run(engine, "acme", "s", IDS, n=10)
    dropped = engine.metrics.rolled_back.labels("dropped")._value.get()
    if cut == "cancel":
        tid, events = _start_long_call(engine, "s")
        _cancel(engine, tid)
        assert isinstance(events[-1], TokensEvent)  # a cancelled call ends silently: its consumer has gone
    else:
        assert _outcome(engine, "s", n=4000, deadline=time.time() - 1).code == "DEADLINE_EXCEEDED"
    assert engine.tier.get_manifest("acme", "s").tokens == IDS + first
    assert engine.info("acme", "s").result().token_count == len(IDS) + 10
    assert ("acme", "s") not in engine.sessions.active  # the model ran on that cache: it is dropped
    assert engine.metrics.rolled_back.labels("dropped")._value.get() == dropped + 1
    rest, u = run(engine, "acme", "s", n=20, create=False)
    assert u.kv_source == "recomputed" and first + rest == ref


def test_a_refused_call_keeps_the_device_copy(engine):
    first, _ = run(engine, "acme", "s", IDS, n=4)
    err = _outcome(engine, "s", ids=[5, 10 ** 7])  # outside the vocabulary
    assert err.code == "INVALID_ARGUMENT" and "vocabulary" in err.message
    assert engine.metrics.rolled_back.labels("kept")._value.get() == 1
    _, u = run(engine, "acme", "s", n=2, create=False)
    assert u.kv_source == "device" and u.session_tokens == len(IDS) + 4 + 2


def test_a_new_session_whose_first_call_is_cancelled_never_existed(engine):
    tid, _ = _start_long_call(engine, "new", create=True, ids=IDS)
    _cancel(engine, tid)
    assert engine.tier.get_manifest("acme", "new") is None and engine.sessions.find("acme", "new") is None
    assert _outcome(engine, "new").code == "NOT_FOUND"


def test_manifests_written_while_a_call_runs_record_only_the_committed_history(engine, tiny_model_dir,
                                                                              redis_server):
    ref, _ = run(engine, "acme", "ref", IDS, n=30)
    first, _ = run(engine, "acme", "s", IDS, n=10)
    tid, _ = _start_long_call(engine, "s")
    assert engine.pin("acme", "s", True).result()  # a pin persists the session mid-call
    m = engine.tier.get_manifest("acme", "s")
    assert m.pinned and m.tokens == IDS + first
    engine.sessions.history.check_epoch([])
    redis_server.client().flushall()  # Redis loses its data mid-call: the worker writes its histories back
    engine.scheduler.call(engine.sessions.sync_storage).result(timeout=30)
    assert engine.tier.get_manifest("acme", "s").tokens == IDS + first
    # The worker dies now: another one resumes the session from Redis alone.
    other = make_engine(tiny_model_dir, redis_server.url, redis={"namespace": engine.tier.namespace},
                        tiers={"journal": False})
    try:
        rest, _ = run(other, "acme", "s", n=20, create=False)
        assert first + rest == ref
    finally:
        _cancel(engine, tid)
        other.close()


def test_a_cut_call_on_a_session_whose_last_commit_missed_redis_keeps_that_commit(tiny_model_dir, tmp_path):
    with RedisServer(data_dir=str(tmp_path / "r"), appendonly=True) as server:
        eng = _seeded(make_engine(tiny_model_dir, server.url, redis={"socket_timeout_s": 0.5},
                                  tiers={"journal_dir": str(tmp_path / "j")}))
        try:
            ref, _ = run(eng, "acme", "ref", IDS, n=30)
            first, _ = run(eng, "acme", "s", IDS, n=10)
            server.stop()  # cleanly: its AOF keeps the first call
            second, _ = run(eng, "acme", "s", n=10, create=False)  # committed to the journal only: dirty
            assert eng.sessions.active[("acme", "s")].dirty
            assert _outcome(eng, "s", n=4000, deadline=time.time() - 1).code == "DEADLINE_EXCEEDED"
            assert ("acme", "s") not in eng.sessions.active and ("acme", "s") in eng.sessions.unsaved
            server.start()
            assert eng.tier.get_manifest("acme", "s").tokens == IDS + first  # Redis is behind
            eng._housekeeping()
            assert eng.tier.get_manifest("acme", "s").tokens == IDS + first + second and not eng.sessions.unsaved
            rest, _ = run(eng, "acme", "s", n=10, create=False)
            assert first + second + rest == ref
        finally:
            eng.close()


def test_a_worker_started_on_the_legacy_key_layout_migrates_and_resumes_token_for_token(tiny_model_dir,
                                                                                       redis_server):
    """Sessions stored by a build before issue 17 (one `{tenant}` slot) are migrated when a worker starts and
    resume from their stored KV exactly like a twin that never left the device."""
    from tests.kvstore.tiers.test_legacy_layout import _legacy_keys, legacy_commit

    gen = random.Random(3)
    ids = [gen.randrange(1000, 20000) for _ in range(150)]
    old = make_engine(tiny_model_dir, redis_server.url, tiers={"journal": False})
    ns = old.cfg.redis.namespace
    try:
        run(old, "acme", "seed", ids, n=1)  # the prefix goes hot: both sessions below take one path (adopt it)
        first, _ = run(old, "acme", "m", ids)
        twin, _ = run(old, "acme", "twin", ids, n=24)
        old.evict("acme", "m").result()
        m = old.tier.get_manifest("acme", "m")
        data = dict(zip([r.key for r in m.blocks], old.tier.get_blocks("acme", m.blocks)))
        assert old.tier.delete_session("acme", "m")  # what is left is the legacy layout's copy
        legacy_commit(old.tier.client, ns, m, data)
        old.tier.client.delete(old.tier.keys.layout_key)  # this build's start marked the layout done; an old one never does
    finally:
        old.close()
    new = make_engine(tiny_model_dir, redis_server.url, tiers={"journal": False}, redis={"namespace": ns})
    try:
        assert new.tier.get_manifest("acme", "m") == m and _legacy_keys(new.tier.client, ns) == []
        rest, u = run(new, "acme", "m", create=False)
        assert u.kv_source == "restored" and first + rest == twin
    finally:
        new.close()


def test_every_model_pass_runs_on_the_engine_thread(tiny_model_dir, redis_server, monkeypatch):
    """Start-up (the batch-invariance check's passes) and calls run the model on the engine thread only: a
    second thread running torch ops keeps a second OpenMP team alive, which slows the engine's (scheduler.py)."""
    import threading

    from services.worker.model_runner import ModelRunner

    threads = set()

    def noting(real):
        def pass_(self, *a, **k):
            threads.add(threading.current_thread().name)
            return real(self, *a, **k)
        return pass_

    for name in ("logits", "forward_rows"):  # every pass goes through one of these
        monkeypatch.setattr(ModelRunner, name, noting(getattr(ModelRunner, name)))
    eng = make_engine(tiny_model_dir, redis_server.url)
    try:
        assert threads == {"kvstash-engine"}  # the start-up checks ran passes, all on the engine thread
        run(eng, "acme", "t1", IDS[:20], n=3)
        assert threads == {"kvstash-engine"}
    finally:
        eng.close()


def test_the_load_signal_reports_the_device_bytes_the_engine_thread_summed(engine):
    """`occupancy` is asked from other threads (the actor's); it never reads a cache there (a window's lazy join
    raced with the engine thread's, tests/kvstore/quant/test_window.py), but the sum the engine thread made."""
    before = engine.scheduler.call(lambda: (engine.sessions.offload_idle(), engine.sessions.device_bytes())[1]).result(60)
    assert engine.occupancy().device_bytes == before
    run(engine, "acme", "load", list(range(1000, 1040)), n=4)
    summed = engine.scheduler.call(lambda: (engine.sessions.offload_idle(), engine.sessions.device_bytes())[1]).result(60)
    assert summed > before and engine.occupancy().device_bytes == summed
