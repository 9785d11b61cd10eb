"""`CpuShare`: where a machine's CPU went during a benchmark window, by the role of each process (Linux /proc).

A benchmark that runs the whole service on the machine it measures (`kvstash bench load`: clients, gateway,
Ray and the worker share the cores) reports next to its throughput how many cores each role used, so a gap
between the engine alone and the service is attributed by a command, not by hand.

Roles, by a process's command line: `worker` (Ray worker actors: `ray::WorkerActor`), `gateway` (`kvstash up`,
which runs the gateway and the Ray driver), `redis` (redis-server), `clients` (the benchmark's own process),
`ray` (Ray's other processes: raylet, GCS, dashboard, idle workers), `other` (everything else).

Invariants: a role's figure is CPU seconds (user + system, every thread) of the processes alive at both ends of
the window, over the window's wall seconds: 2.0 is two cores busy. Processes that start or end inside the
window are not counted. Without /proc (not Linux) every figure is empty.
"""

from __future__ import annotations

import os
import time

ROLES = ("worker", "gateway", "clients", "redis", "ray", "other")  # in the order reports print them


def role_of(cmdline: str, pid: int, own_pid: int) -> str:
    """The role of a process with this command line (NUL-separated arguments joined by spaces)."""
    if pid == own_pid:
        return "clients"
    if cmdline.startswith("ray::WorkerActor"):
        return "worker"
    if "services.cli.main up" in cmdline or "kvstash up" in cmdline:
        return "gateway"
    if "redis-server" in cmdline:
        return "redis"
    if cmdline.startswith("ray::") or "/ray/" in cmdline:
        return "ray"
    return "other"


def _snapshot() -> dict[int, tuple[float, str]]:
    """pid -> (CPU seconds so far, command line) of every process readable now."""
    tick = os.sysconf("SC_CLK_TCK")
    out = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            with open(f"/proc/{name}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            continue
        out[int(name)] = ((int(fields[11]) + int(fields[12])) / tick, cmd)
    return out


class CpuShare:
    """Start at construction; `cores()` gives each role's cores used since then."""

    def __init__(self):
        self._on = os.path.isdir("/proc")
        self._t0 = time.monotonic()
        self._before = _snapshot() if self._on else {}

    def cores(self) -> dict[str, float]:
        """Role -> cores used (CPU seconds / wall seconds) since construction; {} without /proc."""
        if not self._on:
            return {}
        after, wall = _snapshot(), max(time.monotonic() - self._t0, 1e-9)
        used = dict.fromkeys(ROLES, 0.0)
        me = os.getpid()
        for pid, (cpu, cmd) in after.items():
            if pid in self._before:
                used[role_of(cmd, pid, me)] += max(0.0, cpu - self._before[pid][0])
        return {role: round(v / wall, 3) for role, v in used.items()}
