"""`Scheduler` (services/worker/scheduler.py) on its own: requests are plain generators and the batcher a
small recorder, so the order of solo steps and batched decode passes is observable exactly.

- every waiting decode step of a turn goes into one pass (at most the batcher's largest bucket), and each
  task gets its own result back;
- solo steps (prefill passes) run until the turn's token budget is spent, then a decode pass runs: a long
  prefill never holds the running sessions for its whole length;
- waiting prompt chunks go into one packed prefill pass per turn (as many as the batcher takes), before
  that turn's decode pass, and each task gets its own result;
- a failed pass fails every call in it and the engine goes on; a cancelled task leaves the decode queue;
  every task ends with one terminal event and its generator closed.
"""

import threading
import time

from services.errors import InvalidArgument
from services.wire import DoneEvent, ErrorEvent, Usage
from services.worker.batching import DecodeResult, DecodeStep, PrefillResult, PrefillStep
from services.worker.scheduler import Scheduler


class Recorder:
    """What the scheduler sees of a batcher: the largest bucket and `run`. Records each pass's tokens."""

    def __init__(self, max_rows=4, fail=False):
        self.max_rows, self.fail = max_rows, fail
        self.passes: list[list[int]] = []
        self.log: list[str] = []

    def run(self, steps):
        if self.fail:
            raise InvalidArgument("this pass fails")
        self.passes.append([s.token for s in steps])
        self.log.append(f"decode{len(steps)}")
        return [DecodeResult(logits=s.token * 10, rows=self.max_rows) for s in steps]

    def prefill_take(self, lengths):
        n, room = 0, 100  # chunks that fit 100 tokens, at least one
        while n < len(lengths) and lengths[n] <= room:
            room -= lengths[n]
            n += 1
        return max(1, n)

    def prefill(self, steps):
        if self.fail:
            raise InvalidArgument("this pass fails")
        self.log.append("prefill" + "+".join(str(len(s.ids)) for s in steps))
        return [PrefillResult(logits=sum(s.ids), fed=len(s.ids)) for s in steps]


def _done(sink):
    sink(DoneEvent("length", Usage(0, 0, 0, "new", 0)))


def _wait(pred, timeout=30):
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline
        time.sleep(0.005)


def test_waiting_decode_steps_share_one_pass_and_get_their_own_results():
    rec = Recorder(max_rows=4)
    gate = threading.Event()
    sched = Scheduler(start=lambda: rec)
    got: dict[int, list] = {}

    def task(i):
        def gen(sink):
            results = []
            for step in range(3):
                r = yield DecodeStep(cache=None, token=100 * i + step)
                results.append((r.logits, r.rows))
            got[i] = results
            _done(sink)
        return gen

    try:
        sched.call(gate.wait)  # hold the engine thread until all six are queued
        events = {i: [] for i in range(6)}
        for i in range(6):
            sched.submit(task(i), events[i].append)
        gate.set()
        _wait(lambda: all(ev and isinstance(ev[-1], DoneEvent) for ev in events.values()))
        # each pass takes the four oldest waiting steps: 18 steps in passes of 4, 4, 4, 4, 2
        assert [len(p) for p in rec.passes] == [4, 4, 4, 4, 2]
        assert got[5] == [(5000, 4), (5010, 4), (5020, 4)]
    finally:
        sched.stop()


def test_solo_steps_spend_the_token_budget_then_a_decode_pass_runs():
    rec = Recorder(max_rows=2)
    gate = threading.Event()
    sched = Scheduler(start=lambda: rec, prefill_tokens_per_step=100)

    def prefill(sink):
        for _ in range(6):  # six passes of 60 tokens
            rec.log.append("prefill60")
            yield 60
        _done(sink)

    def decoder(sink):
        for t in range(4):
            yield DecodeStep(cache=None, token=t)
        _done(sink)

    try:
        sched.call(gate.wait)
        a, b = [], []
        sched.submit(decoder, a.append)
        sched.submit(prefill, b.append)
        gate.set()
        _wait(lambda: a and b and isinstance(a[-1], DoneEvent) and isinstance(b[-1], DoneEvent))
        # budget 100: two prefill passes (60 + 60) per turn, then the waiting decode step
        assert rec.log[:8] == ["prefill60", "prefill60", "decode1", "prefill60", "prefill60", "decode1",
                               "prefill60", "prefill60"]
    finally:
        sched.stop()


def test_waiting_prompt_chunks_share_a_packed_pass_before_the_decode_pass():
    rec = Recorder(max_rows=4)
    gate = threading.Event()
    sched = Scheduler(start=lambda: rec)
    got: dict[int, list] = {}

    def task(i, n):
        def gen(sink):
            r = yield PrefillStep(cache=None, ids=[i] * n)
            d = yield DecodeStep(cache=None, token=i)
            got[i] = [r.logits, r.fed, d.logits]
            _done(sink)
        return gen

    try:
        sched.call(gate.wait)
        events = {i: [] for i in range(4)}
        for i, n in enumerate((40, 50, 30, 20)):
            sched.submit(task(i, n), events[i].append)
        gate.set()
        _wait(lambda: all(ev and isinstance(ev[-1], DoneEvent) for ev in events.values()))
        # turn 1: the chunks of 40 + 50 fit 100 tokens, then those two sessions' first decode steps; turn 2:
        # the other two chunks, then their decode steps
        assert rec.log == ["prefill40+50", "decode2", "prefill30+20", "decode2"]
        assert got[1] == [50, 50, 10] and got[3] == [60, 20, 30]
    finally:
        sched.stop()


def test_a_failed_pass_fails_its_calls_and_a_cancelled_task_leaves_the_queue():
    rec = Recorder(fail=True)
    closed = []
    sched = Scheduler(start=lambda: rec)

    def gen(sink):
        try:
            yield DecodeStep(cache=None, token=1)
            _done(sink)
        finally:
            closed.append(True)

    try:
        events = [[], []]
        for ev in events:
            sched.submit(gen, ev.append)
        _wait(lambda: all(events))
        assert all(isinstance(ev[-1], ErrorEvent) and ev[-1].code == "INVALID_ARGUMENT" for ev in events)
        _wait(lambda: len(closed) == 2)
        assert sched.call(lambda: sched.depth).result(timeout=30) == 0

        rec.fail = False
        gate = threading.Event()
        sched.call(gate.wait)
        kept, cut = [], []
        sched.submit(gen, kept.append)
        tid = sched.submit(gen, cut.append)
        sched.cancel(tid)
        gate.set()
        _wait(lambda: kept and isinstance(kept[-1], DoneEvent))
        sched.call(lambda: None).result(timeout=30)
        assert cut == [] and rec.passes[-1] == [1]  # the cancelled task's step never ran
        _wait(lambda: len(closed) == 3)  # the cancelled one never started: nothing of it to close
    finally:
        sched.stop()


def test_a_decode_step_without_a_batcher_is_an_internal_error():
    sched = Scheduler()

    def gen(sink):
        yield DecodeStep(cache=None, token=1)

    try:
        ev = []
        sched.submit(gen, ev.append)
        _wait(lambda: ev)
        assert isinstance(ev[-1], ErrorEvent) and ev[-1].code == "INTERNAL"
    finally:
        sched.stop()


def test_start_runs_first_on_the_engine_thread_and_returns_the_batcher():
    rec, seen = Recorder(max_rows=2), []

    def start():
        seen.append(threading.current_thread().name)
        return rec

    sched = Scheduler(start=start)
    try:
        assert seen == ["kvstash-engine"]  # done before the constructor returned

        def gen(sink):
            result = yield DecodeStep(cache=None, token=3)
            sink(result)
            _done(sink)

        ev = []
        sched.submit(gen, ev.append)
        _wait(lambda: len(ev) == 2)
        assert ev[0].logits == 30 and rec.passes == [[3]]  # the batcher start returned serves the passes
    finally:
        sched.stop()


def test_a_failed_start_raises_from_the_constructor_and_ends_the_thread():
    def start():
        raise InvalidArgument("no model here")

    before = {t.name for t in threading.enumerate() if t.is_alive()}
    try:
        Scheduler(start=start)
    except InvalidArgument as e:
        assert "no model here" in str(e)
    else:
        raise AssertionError("the constructor did not raise")
    _wait(lambda: sum(t.name == "kvstash-engine" for t in threading.enumerate())
          <= sum(n == "kvstash-engine" for n in before))
