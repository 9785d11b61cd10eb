"""The gateway imports no worker code and none of the model stack (torch, transformers, numba): its process
starts in about a second with a small footprint, and its image needs no torch (deploy/docker).

Each check imports in a fresh interpreter, so what earlier tests imported does not count. Import time and
peak RSS are printed (run with -s to see them), never asserted: the machine's load decides them. Peak RSS
is the interpreter's own VmHWM; ru_maxrss is printed too, but Linux carries it over from the forking
process (here pytest, with torch loaded), so it is the larger of the two.
"""

import pytest

from services.bench.gateway import imported

HEAVY = ("torch", "transformers", "numba")


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
