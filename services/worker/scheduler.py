"""`Scheduler`: one engine thread that runs every request's forward passes, decode steps batched.

A request is a generator that yields between forward passes. What it yields says what it waits for:
- `None`, or an int n (the tokens its own pass just fed: a prefill chunk, a replayed pass): it wants
  another *solo* step; solo steps run round-robin;
- a `DecodeStep` (services/worker/batching.py): it waits for a decode step, which the scheduler runs
  together with every other waiting step in one batched pass (`Batcher.run`) and sends back as a
  `DecodeResult`;
- a `PrefillStep`: it waits for its prompt's last chunk to be fed, which the scheduler runs packed with the
  other waiting chunks in one pass (`Batcher.prefill`) and sends back as a `PrefillResult`.

Each turn of the loop runs solo steps until `prefill_tokens_per_step` tokens were fed (at least one when
any is waiting), then one packed prefill pass over the oldest waiting chunks (as many as the largest packed
size holds), then one batched decode pass over the oldest waiting steps (up to the batcher's largest
bucket). So a long prompt is prefilled a chunk per turn and never stalls the running sessions for its
whole prefill, and new prompts get their first token without waiting for every running session to end.
Control operations (offload, delete, describe) are closures run on the same thread between turns, so
session state is only ever touched by this one thread.

The engine thread is also the only thread of the process that runs the model, its start-up included
(`start`, run on it before anything else). Not for safety but for speed: torch's CPU ops run in OpenMP
teams, one per thread that ever opened a parallel region, and libgomp, once its threads outnumber the
cores, makes every team's workers sleep almost at once between regions. A start-up forward pass on the
caller's thread (whose team lives as long as that thread) made every parallel elementwise op of the
engine thread 4-8x slower and a whole decode pass ~1.6x slower, measured on this 2-core machine.

Invariants:
- Every submitted task ends with exactly one terminal event for its sink (`services.wire.is_terminal`:
  done, prefix shared, or an `ErrorEvent`); a cancelled task ends silently: its consumer has gone.
- A task's generator is always closed, so its `finally` blocks (releasing the session) always run.
- A task is in exactly one of: the solo queue, the prefill queue, the decode queue, or neither (finished).
"""

from __future__ import annotations

import collections
import itertools
import logging
import queue
import threading
import time
from collections.abc import Callable, Generator
from concurrent.futures import Future
from dataclasses import dataclass, field

from services.errors import Internal, KvstashError
from services.wire import ErrorEvent, Event
from services.worker.batching import DecodeStep, PrefillStep

log = logging.getLogger(__name__)

Sink = Callable[[Event], None]


@dataclass
class Task:
    id: int
    gen: Generator[None, None, None]
    sink: Sink
    cancelled: bool = False
    started: float = field(default_factory=time.perf_counter)
    step: DecodeStep | PrefillStep | None = None  # the step it waits for (then it is in that step's queue)


class Scheduler:
    def __init__(self, on_idle: Callable[[], None] | None = None, idle_interval_s: float = 5.0,
                 prefill_tokens_per_step: int = 512, start: Callable[[], object] | None = None):
        """`start()`, when given, runs first on the engine thread (loading the model, checking batch invariance)
        and returns the batcher (None: no batched passes); the constructor waits for it and raises what it
        raised."""
        self._inbox: queue.Queue = queue.Queue()
        self._running: collections.deque[Task] = collections.deque()  # the solo queue
        self._decoding: list[Task] = []  # waiting for a decode step, oldest first
        self._prefilling: list[Task] = []  # waiting for a packed prefill chunk, oldest first
        self._batcher, self._budget = None, prefill_tokens_per_step
        self._tasks: dict[int, Task] = {}
        self._ids = itertools.count(1)
        self._on_idle, self._idle_interval = on_idle, idle_interval_s
        self._stop = threading.Event()
        self._started: Future = Future()
        self._thread = threading.Thread(target=self._run, args=(start,), name="kvstash-engine", daemon=True)
        self._thread.start()
        self._started.result()

    # ---- API (any thread) ------------------------------------------------------------------
    def submit(self, make_gen: Callable[[Sink], Generator[None, None, None]], sink: Sink) -> int:
        """Schedule `make_gen(sink)`; returns a task id for `cancel`."""
        task_id = next(self._ids)
        self._inbox.put(("task", task_id, make_gen, sink))
        return task_id

    def cancel(self, task_id: int) -> None:
        self._inbox.put(("cancel", task_id, None, None))

    def call(self, fn: Callable[[], object]) -> Future:
        """Run `fn` on the engine thread between steps; its result or exception lands in the Future."""
        fut: Future = Future()
        self._inbox.put(("call", 0, fn, fut))
        return fut

    @property
    def depth(self) -> int:
        return len(self._tasks) + self._inbox.qsize()

    def stop(self) -> None:
        self._stop.set()
        self._inbox.put(("noop", 0, None, None))
        self._thread.join(timeout=10)

    # ---- engine thread -------------------------------------------------------------------------
    def _run(self, start: Callable[[], object] | None) -> None:
        try:
            if start is not None:
                self._batcher = start()
        except BaseException as e:  # noqa: BLE001 - the constructor raises it
            self._started.set_exception(e)
            return
        self._started.set_result(None)
        self._loop()

    def _loop(self) -> None:
        next_idle = time.monotonic() + self._idle_interval
        while not self._stop.is_set():
            self._drain_inbox(block=not (self._running or self._decoding or self._prefilling),
                              timeout=max(0.0, next_idle - time.monotonic()))
            budget = self._budget
            while self._running and budget > 0:
                budget -= max(1, self._step(self._running.popleft()))
            if self._prefilling:
                self._prefill()
            if self._decoding:
                self._decode()
            if self._on_idle is not None and time.monotonic() >= next_idle:
                next_idle = time.monotonic() + self._idle_interval
                try:
                    self._on_idle()
                except Exception:  # noqa: BLE001 - housekeeping must never kill the engine
                    log.exception("idle housekeeping failed")
        for task in list(self._tasks.values()):
            self._finish(task)

    def _drain_inbox(self, block: bool, timeout: float) -> None:
        try:
            item = self._inbox.get(block=block, timeout=timeout if block else None)
        except queue.Empty:
            return
        while True:
            self._handle(*item)
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                return

    def _handle(self, kind: str, task_id: int, fn, arg) -> None:
        if kind == "task":
            try:
                task = Task(task_id, fn(arg), arg)
            except Exception as e:  # noqa: BLE001
                _emit_error(arg, e)
                return
            self._tasks[task_id] = task
            self._running.append(task)
        elif kind == "cancel":
            task = self._tasks.get(task_id)
            if task is not None:
                task.cancelled = True
                self._finish(task)
        elif kind == "call":
            if arg.set_running_or_notify_cancel():
                try:
                    arg.set_result(fn())
                except BaseException as e:  # noqa: BLE001
                    arg.set_exception(e)

    def _step(self, task: Task, value=None) -> int:
        """Advance the task by one step (sending `value`); returns the tokens its solo pass fed."""
        if task.cancelled:
            return 0
        try:
            out = task.gen.send(value)
        except StopIteration:
            self._finish(task)
            return 0
        except Exception as e:  # noqa: BLE001
            _emit_error(task.sink, e)
            self._finish(task)
            return 0
        if isinstance(out, (DecodeStep, PrefillStep)):
            if self._batcher is None:
                _emit_error(task.sink, Internal("a batched step was asked of a scheduler without a batcher"))
                self._finish(task)
                return 0
            task.step = out
            if isinstance(out, PrefillStep):
                self._prefilling.append(task)
                return 0
            self._decoding.append(task)
            return out.fed
        self._running.append(task)
        return out if isinstance(out, int) else 0

    def _decode(self) -> None:
        """One batched pass over the oldest waiting decode steps; each task then takes its next step."""
        batch = self._decoding[:self._batcher.max_rows]
        del self._decoding[:len(batch)]
        self._run_batch(batch, self._batcher.run)

    def _prefill(self) -> None:
        """One packed pass over the oldest waiting prompt chunks; each task then takes its next step."""
        batch = self._prefilling[:self._batcher.prefill_take([len(t.step.ids) for t in self._prefilling])]
        del self._prefilling[:len(batch)]
        self._run_batch(batch, self._batcher.prefill)

    def _run_batch(self, batch: list[Task], run: Callable[[list], list]) -> None:
        try:
            results = run([t.step for t in batch])
        except Exception as e:  # noqa: BLE001 - the pass failed: every call in it fails, the engine goes on
            for task in batch:
                _emit_error(task.sink, e)
                self._finish(task)
            return
        for task, result in zip(batch, results):
            task.step = None
            self._step(task, result)

    def _finish(self, task: Task) -> None:
        self._tasks.pop(task.id, None)
        for q in (self._running, self._decoding, self._prefilling):
            try:
                q.remove(task)
            except ValueError:
                pass
        try:
            task.gen.close()
        except Exception:  # noqa: BLE001
            log.exception("closing task %d failed", task.id)


def _emit_error(sink: Sink, e: Exception) -> None:
    if not isinstance(e, KvstashError):
        log.exception("request failed", exc_info=e)
        e = Internal(f"internal error: {type(e).__name__}")
    try:
        sink(ErrorEvent.of(e))
    except Exception:  # noqa: BLE001
        log.exception("sink failed")
