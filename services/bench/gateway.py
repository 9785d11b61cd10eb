"""`kvstash bench gateway`: what the gateway process and image cost, against the worker stack it used to import.

    kvstash bench gateway [--reps 3] [--json]

Before issue 18 the gateway imported worker code (and through it torch, transformers and numba); now it
imports `services.wire` and the API stubs only. Both sides are measured in this run:
- **import**: a fresh interpreter imports `services.gateway.server` (the gateway today), and another
  imports `services.worker.engine` (the worker stack, which the old gateway pulled in); reported: median
  seconds over `--reps`, peak RSS (the interpreter's VmHWM), modules loaded, and whether torch is among them;
- **image**: the installed size of the Python distributions each side needs, read from this environment's
  package metadata (the files each distribution's RECORD lists): the gateway image's
  deploy/docker/gateway-requirements.txt and its dependency closure, against the project's full
  dependency closure (what the image installed before: torch, transformers, numba, numpy ...). The base
  image (python:3.11-slim) is the same on both sides and left out.
"""

from __future__ import annotations

import json
import os
import re
import statistics
import subprocess
import sys
from importlib import metadata
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
GATEWAY_REQUIREMENTS = REPO / "deploy" / "docker" / "gateway-requirements.txt"
SIDES = {"gateway": "services.gateway.server", "worker stack": "services.worker.engine"}

# Imports the modules named in argv in this fresh interpreter; prints seconds, VmHWM and the modules loaded.
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
    """Import `modules` in a fresh interpreter (this repository first on the path): seconds, VmHWM, modules."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-c", PROBE, *modules], cwd=REPO, env=env, check=True,
                         capture_output=True, text=True, timeout=300).stdout
    return json.loads(out.strip().splitlines()[-1])


def _name(requirement: str) -> str:
    return re.split(r"[\s<>=!~;\[]", requirement.strip(), maxsplit=1)[0].lower().replace("_", "-")


def closure(roots: list[str]) -> set[str]:
    """The installed distributions `roots` need, transitively (environment markers honoured, extras ignored
    unless named in the root requirement)."""
    seen: set[str] = set()
    todo = list(roots)
    while todo:
        req = todo.pop()
        name = _name(req)
        if not name or name in seen:
            continue
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue  # optional on this platform
        seen.add(name)
        extras = set(re.findall(r"\[([^\]]+)\]", req)[0].split(",")) if "[" in req.split(";")[0] else set()
        for dep in dist.requires or []:
            spec, _, marker = dep.partition(";")
            if marker.strip():
                m = re.search(r"extra\s*==\s*['\"]([^'\"]+)['\"]", marker)
                if m and m.group(1) not in extras:
                    continue
                if not m and not _marker_holds(marker):
                    continue
            todo.append(spec)
    return seen


def _marker_holds(marker: str) -> bool:
    from packaging.markers import Marker

    try:
        return Marker(marker.strip()).evaluate()
    except Exception:  # noqa: BLE001 - an unparsable marker counts as not applying
        return False


def installed_bytes(name: str) -> int:
    """Bytes of the files a distribution's RECORD lists."""
    return sum(f.size or 0 for f in metadata.distribution(name).files or [])


def gateway_roots() -> list[str]:
    return [line for line in GATEWAY_REQUIREMENTS.read_text().splitlines() if line.strip()
            and not line.startswith("#")]


def project_roots() -> list[str]:
    return list(metadata.distribution("kvstash").requires or [])


def run_gateway(args) -> int:
    rows = []
    for side, module in SIDES.items():
        runs = [imported(module) for _ in range(args.reps)]
        mods = runs[-1]["modules"]
        rows.append({"side": side, "module": module, "seconds": statistics.median(r["seconds"] for r in runs),
                     "peak_rss_mib": statistics.median(r["hwm_mib"] for r in runs), "modules": len(mods),
                     "torch": "torch" in mods})
    gw, full = closure(gateway_roots()), closure([r for r in project_roots() if "extra ==" not in r])
    size = {n: installed_bytes(n) for n in gw | full}  # each distribution's RECORD read once
    image = {"gateway_dists": len(gw), "gateway_mib": sum(size[n] for n in gw) / 2**20,
             "full_dists": len(full), "full_mib": sum(size[n] for n in full) / 2**20,
             "dropped": sorted(full - gw, key=lambda n: -size[n])[:8]}
    if args.json:
        print(json.dumps({"imports": rows, "image": image}, indent=1))
        return 0
    base = rows[1]
    print("| process | imports | seconds | vs worker stack | peak RSS MiB | vs worker stack | modules | torch |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | --- |")
    for r in rows:
        print(f"| {r['side']} | `{r['module']}` | {r['seconds']:.2f} | {r['seconds'] / base['seconds']:.2f}x "
              f"| {r['peak_rss_mib']:.0f} | {r['peak_rss_mib'] / base['peak_rss_mib']:.2f}x | {r['modules']} "
              f"| {'yes' if r['torch'] else 'no'} |")
    print(f"\nPython packages of the gateway image: {image['gateway_mib']:.0f} MiB in {image['gateway_dists']} "
          f"distributions, against {image['full_mib']:.0f} MiB in {image['full_dists']} for the full package "
          f"({image['gateway_mib'] / image['full_mib']:.2f}x); the largest left out: {', '.join(image['dropped'])}")
    return 0
