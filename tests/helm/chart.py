"""Chart test helpers: find helm, render the chart, pick objects, match label selectors.

Helm is `<repo>/.tools/bin/helm` (scripts/install_helm.sh installs it) or $KVSTASH_HELM. Without it the
tests fail, never skip.
"""

from __future__ import annotations

import functools
import os
import subprocess
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "helm" / "kvstash"
RELEASE = "demo"
NAMESPACE = "kvstash"
# The values profiles the chart ships: name -> values file (None: values.yaml alone).
PROFILES = {
    "default": None,
    "cpu": "values-cpu.yaml",
    "gpu": "values-gpu.yaml",
    "external-redis": "values-external-redis.yaml",
    "external-redis-cluster": "values-external-redis-cluster.yaml",
}


def helm_path() -> Path:
    path = Path(os.environ.get("KVSTASH_HELM") or REPO / ".tools" / "bin" / "helm")
    if not (path.is_file() and os.access(path, os.X_OK)):
        pytest.fail(f"helm not found at {path}: run scripts/install_helm.sh (or set KVSTASH_HELM)", pytrace=False)
    return path


def helm(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(helm_path()), *args], capture_output=True, text=True, timeout=60)


def value_args(profile: str | None = None, sets: tuple[str, ...] = ()) -> list[str]:
    args = []
    if profile and PROFILES[profile]:
        args += ["-f", str(CHART / PROFILES[profile])]
    for s in sets:
        args += ["--set", s]
    return args


@functools.cache
def render(profile: str = "default", sets: tuple[str, ...] = ()) -> tuple[dict, ...]:
    """The objects `helm template` renders for a profile plus `--set` overrides."""
    res = helm("template", RELEASE, str(CHART), "--namespace", NAMESPACE, *value_args(profile, sets))
    assert res.returncode == 0, f"helm template failed:\n{res.stderr}"
    return tuple(d for d in yaml.safe_load_all(res.stdout) if d)


def objects(docs, kind: str) -> list[dict]:
    return [d for d in docs if d["kind"] == kind]


def one(docs, kind: str, name: str | None = None) -> dict:
    found = [d for d in objects(docs, kind) if name is None or d["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name or ''}, got {[d['metadata']['name'] for d in found]}"
    return found[0]


def container(workload: dict, name: str) -> dict:
    return next(c for c in workload["spec"]["template"]["spec"]["containers"] if c["name"] == name)


def pod_templates(docs) -> dict[str, dict]:
    """Every pod template the chart renders, by a readable name: Deployments, StatefulSets, Ray groups."""
    out = {}
    for d in docs:
        if d["kind"] in ("Deployment", "StatefulSet"):
            out[f"{d['kind']}/{d['metadata']['name']}"] = d["spec"]["template"]
        elif d["kind"] == "RayCluster":
            out["RayCluster/head"] = d["spec"]["headGroupSpec"]["template"]
            for g in d["spec"]["workerGroupSpecs"]:
                out[f"RayCluster/{g['groupName']}"] = g["template"]
    return out


def selector_matches(selector: dict, labels: dict) -> bool:
    """Kubernetes LabelSelector semantics (matchLabels and matchExpressions)."""
    for k, v in (selector.get("matchLabels") or {}).items():
        if labels.get(k) != v:
            return False
    for e in selector.get("matchExpressions") or []:
        key, op, values = e["key"], e["operator"], e.get("values") or []
        ok = {"In": key in labels and labels[key] in values,
              "NotIn": key not in labels or labels[key] not in values,
              "Exists": key in labels, "DoesNotExist": key not in labels}[op]
        if not ok:
            return False
    return True


def values_yaml() -> dict:
    return yaml.safe_load((CHART / "values.yaml").read_text())
