"""`Router`'s placement: session affinity, then prefix locality weighed against load, then the least loaded
live worker (ties round-robin); a worker whose actor died leaves routing and the affinity table. (Creating it
again, `poll` -> `_revive`, calls `ray.kill` on the old actor and is covered against real actors in
test_failover.py.)

The workers are in-process stand-ins for the Ray actors: each method's `.remote(...)` returns a `Reply`,
which is awaitable and has `.future()` as a Ray ObjectRef has, so the Router runs its own code unchanged
(only the worker's side is a stand-in). Their answers are fixed, so every placement is exact."""

import asyncio
import concurrent.futures

import pytest
from ray.exceptions import RayActorError

from services.errors import Unavailable
from services.gateway.router import Router, WorkerHandle
from services.wire import WorkerLoad, WorkerReady


class Reply:
    """A finished remote call: its value, or the exception it raised."""

    def __init__(self, value):
        self.value = value

    def future(self) -> concurrent.futures.Future:
        f = concurrent.futures.Future()
        if isinstance(self.value, BaseException):
            f.set_exception(self.value)
        else:
            f.set_result(self.value)
        return f

    def __await__(self):
        return asyncio.wrap_future(self.future()).__await__()


class Method:
    def __init__(self, actor: "StandInWorker", fn):
        self.actor, self.fn = actor, fn

    def remote(self, *args) -> Reply:
        self.actor.calls.append((self.fn.__name__, *args))
        if self.actor.dead:
            return Reply(RayActorError())
        try:
            return Reply(self.fn(*args))
        except Exception as e:  # noqa: BLE001  (the call's failure travels in the reply, as with Ray)
            return Reply(e)


class StandInWorker:
    """What the Router asks a worker: does it hold a session, how much of a prompt is hot, its load."""

    def __init__(self, sessions=(), hot: int | Exception = 0, load: WorkerLoad | None = None):
        self.sessions, self.hot, self.polled = set(sessions), hot, load or WorkerLoad()
        self.dead = False
        self.calls: list[tuple] = []
        for fn in (self._holds, self._prefix_match, self._occupancy, self._metrics_snapshot, self._ready):
            setattr(self, fn.__name__[1:], Method(self, fn))

    def _holds(self, tenant, session_id):
        return (tenant, session_id) in self.sessions

    def _prefix_match(self, tenant, new_input):
        if isinstance(self.hot, Exception):
            raise self.hot
        return self.hot

    def _occupancy(self):
        return self.polled

    def _metrics_snapshot(self):
        return []

    def _ready(self):
        return WorkerReady(worker="stand-in", fingerprint="", device="cpu")

    def asked(self, method: str) -> int:
        return sum(1 for c in self.calls if c[0] == f"_{method}")


def _router(*actors, tokens_per_request=256, spawn=None) -> Router:
    return Router([WorkerHandle(f"w{i}", a) for i, a in enumerate(actors)], spawn=spawn,
                  tokens_per_request=tokens_per_request)


def _place(router, session, new_input=None, tenant="t") -> str:
    return asyncio.run(router.place(tenant, session, new_input)).id


PROMPT = {"token_ids": [1, 2, 3]}


def test_a_remembered_session_goes_to_its_worker_without_asking_anyone():
    a, b = StandInWorker(), StandInWorker()
    r = _router(a, b)
    r.affinity[("t", "s")] = "w1"
    assert _place(r, "s", PROMPT) == "w1"
    assert a.calls == [] and b.calls == []


def test_an_unknown_session_goes_to_the_worker_that_holds_it_and_is_remembered():
    a, b, c = StandInWorker(), StandInWorker(sessions=[("t", "s")]), StandInWorker()
    r = _router(a, b, c)
    assert _place(r, "s") == "w1" and r.affinity == {("t", "s"): "w1"}
    assert _place(r, "s") == "w1" and b.asked("holds") == 1  # the second time from the table


def test_sessions_are_per_tenant():
    a, b = StandInWorker(), StandInWorker(sessions=[("other", "s")])
    r = _router(a, b)
    assert _place(r, "s", tenant="t") == "w0"  # w1 holds another tenant's "s": not this one


def test_a_new_session_goes_to_the_least_loaded_worker_open_streams_first():
    r = _router(StandInWorker(), StandInWorker(), StandInWorker())
    for wid, streams, depth in (("w0", 2, 0), ("w1", 1, 5), ("w2", 1, 1)):
        r.workers[wid].inflight, r.workers[wid].load = streams, WorkerLoad(queue_depth=depth)  # as polled
    assert _place(r, "s") == "w2"  # w1 and w2 have one stream each; w2's polled queue is shorter


def test_equally_loaded_workers_take_new_sessions_in_turn():
    r = _router(StandInWorker(), StandInWorker(), StandInWorker())
    assert [_place(r, f"s{i}") for i in range(4)] == ["w0", "w1", "w2", "w0"]


def test_a_long_hot_prefix_outweighs_a_little_load():
    idle, warm = StandInWorker(), StandInWorker(hot=1000)
    r = _router(idle, warm, tokens_per_request=256)
    r.workers["w1"].inflight = 1
    assert _place(r, "s", PROMPT) == "w1" and r.prefix_routed == 1  # 1000 - 256 > 0
    assert warm.calls[-1] == ("_prefix_match", "t", PROMPT)


def test_a_busy_worker_loses_a_short_hot_prefix_to_an_idle_one():
    idle, warm = StandInWorker(), StandInWorker(hot=200)
    r = _router(idle, warm, tokens_per_request=256)
    r.workers["w1"].inflight = 1
    assert _place(r, "s", PROMPT) == "w0" and r.prefix_routed == 0  # 200 - 256 < 0


def test_load_is_the_larger_of_open_streams_and_the_polled_queue():
    idle, warm = StandInWorker(), StandInWorker(hot=1000)
    r = _router(idle, warm, tokens_per_request=256)
    r.workers["w1"].load = WorkerLoad(queue_depth=4)  # polled: other gateways' requests; none open from this one
    assert Router.busy(r.workers["w1"]) == 4
    assert _place(r, "s", PROMPT) == "w0" and r.prefix_routed == 0  # 1000 - 4 * 256 < 0


def test_prefix_locality_is_asked_only_for_new_input_and_more_than_one_worker():
    a, b = StandInWorker(hot=1000), StandInWorker(hot=1000)
    r = _router(a, b)
    _place(r, "s0")  # no new input: a resume
    assert a.asked("prefix_match") == b.asked("prefix_match") == 0
    solo = StandInWorker(hot=1000)
    _place(_router(solo), "s1", PROMPT)
    assert solo.asked("prefix_match") == 0


def test_a_worker_that_fails_to_answer_counts_no_hot_tokens():
    failing, warm = StandInWorker(hot=RuntimeError("trie gone")), StandInWorker(hot=300)
    r = _router(failing, warm)
    assert _place(r, "s", PROMPT) == "w1" and r.prefix_routed == 1


def test_a_dead_worker_leaves_routing_and_the_affinity_table():
    a, b = StandInWorker(), StandInWorker()
    r = _router(a, b)
    r.affinity = {("t", "old"): "w0", ("t", "other"): "w1"}
    a.dead = True
    assert _place(r, "s") == "w1"  # asked whether it holds "s", w0 answered with an actor error
    assert not r.workers["w0"].alive and [w.id for w in r.live()] == ["w1"]
    assert r.affinity == {("t", "other"): "w1", ("t", "s"): "w1"}


def test_a_remembered_worker_that_died_is_not_used():
    a, b = StandInWorker(), StandInWorker(sessions=[("t", "s")])
    r = _router(a, b)
    r.affinity[("t", "s")] = "w0"
    r.workers["w0"].alive = False
    assert _place(r, "s") == "w1" and a.calls == []


def test_no_live_worker_is_unavailable():
    r = _router(StandInWorker())
    r.workers["w0"].alive = False
    with pytest.raises(Unavailable):
        _place(r, "s")


def test_forget_drops_the_affinity():
    r = _router(StandInWorker(), StandInWorker())
    r.affinity[("t", "s")] = "w1"
    r.forget("t", "s")
    r.forget("t", "never")
    assert r.affinity == {}


def test_poll_records_loads_and_drops_a_worker_whose_actor_died():
    a, b = StandInWorker(load=WorkerLoad(queue_depth=3)), StandInWorker(load=WorkerLoad(queue_depth=1))
    r = _router(a, b)
    r.affinity[("t", "s")] = "w1"
    b.dead = True
    asyncio.run(r.poll())
    assert r.workers["w0"].load == WorkerLoad(queue_depth=3) and r.workers["w1"].load == WorkerLoad()
    assert [w.id for w in r.live()] == ["w0"] and r.affinity == {}
