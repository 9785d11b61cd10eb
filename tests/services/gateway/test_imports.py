"""The gateway imports no worker code and none of the model stack (torch, transformers, numba): its process
starts in about a second with a small footprint, and its image needs no torch (deploy/docker).

Each check imports in a fresh interpreter, so what earlier tests imported does not count. Import time and
peak RSS are printed (run with -s to see them), never asserted: the machine's load decides them. Peak RSS
is the interpreter's own VmHWM; ru_maxrss is printed too, but Linux carries it over from the forking
process (here pytest, with torch loaded), so it is the larger of the two.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[3]
HEAVY = ("torch", "transformers", "numba")

PROBE = """
import json, resource, sys, time
t0 = time.perf_counter()
for name in sys.argv[1:]:
    __import__(name)
seconds = time.perf_counter() - t0
hwm = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(json.dumps({"seconds": seconds, "maxrss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "hwm_mib": hwm / 1024, "modules": sorted(sys.modules)}))
"""


def imported(*modules: str) -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-c", PROBE, *modules], cwd=REPO, env=env, check=True,
                         capture_output=True, text=True, timeout=300).stdout
    return json.loads(out.strip().splitlines()[-1])


def heavy(modules: list[str], also: tuple[str, ...] = ()) -> list[str]:
    return [m for m in modules if m.split(".")[0] in HEAVY or any(m == p or m.startswith(p + ".") for p in also)]


@pytest.mark.parametrize("module", ["services.gateway.server", "services.gateway.servicer",
                                    "services.gateway.router", "services.gateway.auth"])
def test_the_gateway_imports_no_worker_and_no_model_stack(module):
    got = imported(module)
    assert heavy(got["modules"], also=("services.worker",)) == []
    print(f"\nimport {module}: {got['seconds']:.2f} s, peak RSS {got['hwm_mib']:.0f} MiB "
          f"(ru_maxrss {got['maxrss_mib']:.0f} MiB), {len(got['modules'])} modules")


def test_kvstash_up_in_the_gateway_image_needs_no_model_stack():
    """What the gateway image runs (`kvstash up` -> LocalStack -> WorkerSpawner -> the actor class) loads no
    torch, transformers or numba: the actor imports its engine in its own process."""
    got = imported("services.cli.main", "services.runtime.stack", "services.runtime.workers", "services.worker.actor")
    assert heavy(got["modules"]) == []
    assert "services.worker.engine" not in got["modules"]
