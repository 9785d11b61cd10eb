"""Helper threads whose torch ops open no OpenMP team.

torch's CPU ops run in OpenMP parallel regions. libgomp gives every thread that opens one a team of worker
threads that lives as long as that thread, and once a process's OpenMP threads outnumber its cores it makes
every team's workers sleep almost at once between regions (a throttled spin): each region then waits for its
workers to wake. Measured on 2 cores: one long-lived helper thread that once packed a block (a large bitwise op)
made the engine thread's forward passes ~1.5x slower for as long as the helper lived.

So a helper thread that may run torch ops (the block codec's pool) calls `serial_torch()` first: its ops then
run on the thread alone and no team is made. (`torch.set_num_threads(1)` would do that too, but it also sets
the count that threads started later take on their first op: a worker's engine thread started after it would
run on one core.)

Invariant: after `serial_torch()` returns True, `torch.get_num_threads()` is 1 in the calling thread and
unchanged in every other thread, and threads started later take the process's count as before.
"""

from __future__ import annotations

import ctypes
import functools
import os

import torch


@functools.cache
def _libgomp() -> ctypes.CDLL | None:
    """The OpenMP runtime torch links (its own copy when the wheel bundles one), or None."""
    bundled = os.path.join(os.path.dirname(torch.__file__), "lib", "libgomp.so.1")
    try:
        return ctypes.CDLL(bundled if os.path.exists(bundled) else "libgomp.so.1")
    except OSError:
        return None


def serial_torch() -> bool:
    """Run this thread's torch ops without OpenMP parallel regions. False when it cannot (no libgomp: torch
    then threads as configured)."""
    torch.get_num_threads()  # torch's per-thread set-up first: run later, it would set the count back
    lib = _libgomp()
    if lib is None:
        return False
    lib.omp_set_num_threads(1)  # this thread's own setting (an OpenMP per-thread variable)
    return torch.get_num_threads() == 1
