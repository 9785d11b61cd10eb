"""Forks (`GenerateCall.fork_of`): a new session that starts as a copy of another's history and KV. A real
Engine (tiny model) and a real redis-server; every fork's continuation is checked token for token, and its
cache bit for bit, against a session that took the same path without forking."""

import random

import numpy as np
import pytest

from services.wire import DoneEvent, ErrorEvent, GenerateCall, TokensEvent
from tests.services.worker.test_session_store import block_keys, call_events, make_engine, refcount, run

rng = random.Random(5)
IDS = [rng.randrange(1000, 20000) for _ in range(70)]
MORE = [rng.randrange(1000, 20000) for _ in range(9)]


@pytest.fixture
def engine(tiny_model_dir, redis_server):
    eng = make_engine(tiny_model_dir, redis_server.url)
    run(eng, "acme", "seed", IDS, n=1)  # IDS's prefix is hot: every later session adopts it alike
    yield eng
    eng.close()


def call(engine, sid: str, ids=None, n=12, **kw) -> list:
    """Every event of one call."""
    return call_events(engine, GenerateCall("acme", sid, True, {"token_ids": ids} if ids else None, n, **kw))


def tokens(events) -> list[int]:
    assert isinstance(events[-1], DoneEvent), events[-1]
    return [t for e in events if isinstance(e, TokensEvent) for t in e.ids]


def held(engine, sid: str):
    """The session as the engine holds it, read on the engine thread (a call's DoneEvent is sent before the
    engine releases its session)."""
    return engine.scheduler.call(lambda: engine.sessions.find("acme", sid)).result(timeout=60)


def state(engine, sid: str):
    def read():
        s = engine.sessions.find("acme", sid)
        return list(s.tokens), list(s.schedule), s.cache.export_state()
    return engine.scheduler.call(read).result(timeout=60)


def assert_same_state(a, b) -> None:
    assert a[0] == b[0] and a[1] == b[1]
    assert a[2].meta == b[2].meta and [n for n, _ in a[2].tensors] == [n for n, _ in b[2].tensors]
    for (name, x), (_, y) in zip(a[2].tensors, b[2].tensors):
        assert x.dtype == y.dtype and np.array_equal(x, y), name


def test_a_fork_of_a_hot_session_continues_exactly_and_leaves_its_parent_as_it_was(engine):
    run(engine, "acme", "twin", IDS)
    twin_next, _ = run(engine, "acme", "twin", MORE, create=False)  # the path without a fork
    parent_out, _ = run(engine, "acme", "p", IDS)
    before = held(engine, "p")
    before = (list(before.tokens), list(before.schedule))
    done = call(engine, "c", MORE, fork_of="p")
    assert tokens(done) == twin_next
    usage = done[-1].usage
    assert usage.kv_source == "device" and usage.cached_tokens == len(IDS) + len(parent_out) - 1
    assert usage.prompt_tokens == len(MORE)
    assert_same_state(state(engine, "c"), state(engine, "twin"))  # the fork's KV: the same bits
    p = held(engine, "p")
    assert (p.tokens, p.schedule) == before  # the parent is untouched...
    again, _ = run(engine, "acme", "p", MORE, create=False)
    assert again == twin_next  # ...and its own KV still continues exactly
    assert_same_state(state(engine, "p"), state(engine, "twin"))


def test_a_fork_of_a_stored_session_shares_its_blocks_and_outlives_the_parent(engine):
    run(engine, "acme", "twin", IDS)
    twin_next, _ = run(engine, "acme", "twin", MORE, create=False)
    twin_last, _ = run(engine, "acme", "twin", create=False)
    run(engine, "acme", "p", IDS)
    engine.evict("acme", "p").result()
    parent_blocks = block_keys(engine, "acme", "p")
    done = call(engine, "c", MORE, fork_of="p")
    assert tokens(done) == twin_next and done[-1].usage.kv_source == "restored"
    engine.evict("acme", "c").result()
    shared = [k for k in block_keys(engine, "acme", "c") if k in parent_blocks]
    assert len(shared) >= len(parent_blocks) - 1 >= 1  # all the parent's sealed blocks, by reference
    assert all(refcount(engine, k) == 2 for k in shared)
    engine.delete("acme", "p").result()
    assert all(refcount(engine, k) == 1 for k in shared)  # the fork holds references of its own
    last, u = run(engine, "acme", "c", create=False)
    assert u.kv_source == "restored" and last == twin_last


def test_forks_that_cannot_start_or_are_cut_short_leave_no_session(engine):
    parent, _ = run(engine, "acme", "p", IDS)

    def error(events) -> ErrorEvent:
        assert isinstance(events[-1], ErrorEvent), events[-1]
        return events[-1]

    assert error(call(engine, "c", MORE, fork_of="nope")).code == "NOT_FOUND"
    run(engine, "acme", "taken", IDS[:8], n=1)
    assert error(call(engine, "taken", MORE, fork_of="p")).code == "ALREADY_EXISTS"
    bad = error(call(engine, "c", [10 ** 9], fork_of="p"))  # outside the vocabulary: refused after the copy
    assert bad.code == "INVALID_ARGUMENT"
    assert held(engine, "c") is None and not engine.tier.get_manifest("acme", "c")
    p = held(engine, "p")
    assert p.tokens == IDS + parent and not p.busy
    forked = tokens(call(engine, "c", fork_of="p"))  # no input: the fork continues where the parent stopped
    cont, _ = run(engine, "acme", "p", create=False)
    assert forked == cont
