"""`Scheduler`: one engine thread that interleaves the forward passes of every running request.

A request is a generator that does one forward pass between `yield`s; the scheduler steps the running
generators round-robin, so a long generation never blocks other sessions on the same worker. Control
operations (offload, delete, describe) are closures run on the same thread between steps, so session
state is only ever touched by this one thread.

Invariants:
- Every submitted task ends with exactly one terminal event for its sink (`services.wire.is_terminal`:
  done, prefix shared, or an `ErrorEvent`); a cancelled task ends silently: its consumer has gone.
- A task's generator is always closed, so its `finally` blocks (releasing the session) always run.
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

log = logging.getLogger(__name__)

Sink = Callable[[Event], None]


@dataclass
class Task:
    id: int
    gen: Generator[None, None, None]
    sink: Sink
    cancelled: bool = False
    started: float = field(default_factory=time.perf_counter)


class Scheduler:
    def __init__(self, on_idle: Callable[[], None] | None = None, idle_interval_s: float = 5.0):
        self._inbox: queue.Queue = queue.Queue()
        self._running: collections.deque[Task] = collections.deque()
        self._tasks: dict[int, Task] = {}
        self._ids = itertools.count(1)
        self._on_idle, self._idle_interval = on_idle, idle_interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="kvstash-engine", daemon=True)
        self._thread.start()

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
    def _loop(self) -> None:
        next_idle = time.monotonic() + self._idle_interval
        while not self._stop.is_set():
            self._drain_inbox(block=not self._running, timeout=max(0.0, next_idle - time.monotonic()))
            if self._running:
                self._step(self._running.popleft())
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

    def _step(self, task: Task) -> None:
        if task.cancelled:
            return
        try:
            next(task.gen)
        except StopIteration:
            self._finish(task)
            return
        except Exception as e:  # noqa: BLE001
            _emit_error(task.sink, e)
            self._finish(task)
            return
        self._running.append(task)

    def _finish(self, task: Task) -> None:
        self._tasks.pop(task.id, None)
        try:
            self._running.remove(task)
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
