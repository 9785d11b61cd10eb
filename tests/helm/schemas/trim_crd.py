"""Turn a CRD's openAPIV3Schema into the trimmed JSON Schema the chart tests validate against.

    python tests/helm/schemas/trim_crd.py CRD.yaml VERSION OUT.json

- Core Kubernetes types embedded in the CRD (pod templates, Services, env, resources, ...) are cut down
  to `{"type": ...}`: the tests check pod templates with kubernetes-validate instead.
- Every object that lists `properties` (and does not preserve unknown fields) gets
  `additionalProperties: false`, so a misspelt field fails, as in kubernetes-validate's strict mode.
- Descriptions and `x-kubernetes-*` markers are dropped to keep the file small.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import yaml

CUT = {"template", "headService", "env", "envFrom", "volumeMounts", "resources", "securityContext",
       "tlsConfig", "authorization", "oauth2", "basicAuth", "bearerTokenSecret", "metricRelabelings",
       "relabelings", "ingressOptions", "upgradeStrategy", "historyServerOptions", "gcsFaultToleranceOptions",
       "authOptions", "tlsOptions", "networkPolicy", "scaleStrategy", "attachMetadata"}


def trim(node, name: str = ""):
    if not isinstance(node, dict):
        return node
    if name in CUT and "type" in node:
        return {"type": node["type"]}
    out = {}
    for key, value in node.items():
        if key == "description" or key.startswith("x-kubernetes-"):
            continue
        if key == "properties":
            out[key] = {k: trim(v, k) for k, v in value.items()}
        elif key in ("items", "additionalProperties") and isinstance(value, dict):
            out[key] = trim(value)
        elif key in ("anyOf", "allOf", "oneOf"):
            out[key] = [trim(v) for v in value]
        else:
            out[key] = value
    if "properties" in out and "additionalProperties" not in out \
            and not node.get("x-kubernetes-preserve-unknown-fields"):
        out["additionalProperties"] = False
    return out


def main(src: str, version: str, dest: str) -> None:
    crd = yaml.safe_load(Path(src).read_text())
    ver = next(v for v in crd["spec"]["versions"] if v["name"] == version)
    schema = trim(ver["schema"]["openAPIV3Schema"])
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = f"{crd['spec']['group']}/{version} {crd['spec']['names']['kind']} (trimmed)"
    with open(dest, "w") as f:
        json.dump(schema, f, indent=1, sort_keys=True)
        f.write("\n")


if __name__ == "__main__":
    main(*sys.argv[1:])
