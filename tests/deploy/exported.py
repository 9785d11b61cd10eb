"""What kvstash actually exports on the gateway's /metrics, and which kvstash names a PromQL expression uses.

Exported series come from the real definitions: `WorkerMetrics` and `GatewayMetrics` are instantiated and their
registries collected (a family's type says which series it exposes: counter `_total`; histogram `_bucket`,
`_sum`, `_count`; gauge its name). The gauges the gateway builds inline while polling storage
(`gauge("kvstash_storage_up", ...)` in services/gateway/server.py) are read from that file's syntax tree:
importing the gateway pulls in torch and Ray, which is too slow for these tests.
"""

from __future__ import annotations

import ast
import functools
import re
from pathlib import Path

from prometheus_client import CollectorRegistry

from services.metrics import GatewayMetrics, WorkerMetrics

REPO = Path(__file__).resolve().parents[2]
GATEWAY_SERVER = REPO / "services" / "gateway" / "server.py"

METRIC = re.compile(r"(?<![A-Za-z0-9_:])kvstash_[a-z0-9_]+")
RECORDED = re.compile(r"(?<![A-Za-z0-9_:])kvstash:[A-Za-z0-9_:]+")
SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}


def inline_gateway_gauges(path: Path = GATEWAY_SERVER) -> set[str]:
    """Names passed as the first argument of `gauge(...)` calls in the gateway server."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "gauge"
                and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
            names.add(node.args[0].value)
    assert names, f"found no gauge(\"kvstash_...\") calls in {path}: update tests/deploy/exported.py"
    return names


@functools.cache
def families() -> dict[str, str]:
    """Exported metric family name -> type."""
    out: dict[str, str] = {}
    gateway = CollectorRegistry()
    GatewayMetrics(gateway)
    for registry in (WorkerMetrics().registry, gateway):
        for fam in registry.collect():
            assert fam.type in SUFFIXES, f"{fam.name}: unexpected metric type {fam.type}"
            out[fam.name] = fam.type
    for name in inline_gateway_gauges():
        assert out.get(name, "gauge") == "gauge", f"{name} is a gauge in server.py but a {out[name]} elsewhere"
        out[name] = "gauge"
    return out


@functools.cache
def series() -> frozenset[str]:
    """Every series name a query can select: `kvstash_requests_total`, `kvstash_restore_seconds_bucket`, ..."""
    return frozenset(name + suffix for name, kind in families().items() for suffix in SUFFIXES[kind])


def metric_names(expr: str) -> set[str]:
    return set(METRIC.findall(expr))


def recorded_names(expr: str) -> set[str]:
    return set(RECORDED.findall(expr))
