"""CpuShare (services/bench/cpu.py): processes sorted into roles, and this process's CPU counted as the clients'."""

import os

from services.bench.cpu import ROLES, CpuShare, role_of


def test_processes_are_sorted_into_roles_by_command_line():
    me = os.getpid()
    assert role_of("anything at all", me, me) == "clients"
    assert role_of("ray::WorkerActor.generate", 7, me) == "worker"
    assert role_of("/venv/bin/python -m services.cli.main up --ready-file /tmp/r.json", 7, me) == "gateway"
    assert role_of("/venv/bin/kvstash up", 7, me) == "gateway"
    assert role_of("/usr/bin/redis-server 127.0.0.1:6380", 7, me) == "redis"
    assert role_of("ray::IDLE", 7, me) == "ray"
    assert role_of("/venv/lib/python3.11/site-packages/ray/core/src/ray/raylet/raylet --x", 7, me) == "ray"
    assert role_of("/usr/sbin/sshd -D", 7, me) == "other"


def test_the_cpu_this_process_burns_is_counted_as_the_clients():
    share = CpuShare()
    start = os.times()
    x = 0
    while os.times().user + os.times().system - start.user - start.system < 0.3:  # CPU time, not wall time
        x += 1
    cores = share.cores()
    assert set(cores) == set(ROLES)
    assert all(v >= 0 for v in cores.values())
    assert cores["clients"] > 0
