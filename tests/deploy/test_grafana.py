"""The Grafana dashboard and the Prometheus rules only use metrics kvstash exports; the dashboard's layout is sane
and the Helm chart ships the same file."""

import json

import pytest
import yaml

from tests.deploy import exported
from tests.deploy.exported import REPO

DASHBOARD = REPO / "deploy" / "grafana" / "kvstash.json"
CHART_COPY = REPO / "helm" / "kvstash" / "dashboards" / "kvstash.json"
RULES = REPO / "deploy" / "prometheus" / "rules.yml"
ROWS = ["Traffic", "Latency", "Memory per tier", "Compression and dedup", "Quality", "Tenants", "Storage"]


@pytest.fixture(scope="module")
def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


@pytest.fixture(scope="module")
def rules() -> list[dict]:
    return [rule for group in yaml.safe_load(RULES.read_text())["groups"] for rule in group["rules"]]


def all_panels(dash):
    for p in dash["panels"]:
        yield p
        yield from p.get("panels", [])  # collapsed rows keep their panels inside


def queries(dash):
    """(where, expr) for every panel target and every query variable."""
    for p in all_panels(dash):
        for t in p.get("targets", []):
            if "expr" in t:
                yield f"panel {p['id']} {p.get('title')!r} target {t.get('refId')}", t["expr"]
    for v in dash["templating"]["list"]:
        if v["type"] == "query":
            q = v["query"]["query"] if isinstance(v["query"], dict) else v["query"]
            yield f"variable {v['name']}", q


def test_exported_metrics_are_found():
    """Guards the other tests: the exported set is built from the real definitions, not empty."""
    s = exported.series()
    for name in ("kvstash_requests_total", "kvstash_time_to_first_token_seconds_bucket", "kvstash_kv_bytes",
                 "kvstash_quality_attention_kl_sum", "kvstash_workers", "kvstash_storage_up",
                 "kvstash_stored_sessions"):
        assert name in s
    assert "kvstash_requests" not in s and "kvstash_restore_seconds" not in s  # only real series names


def test_every_query_panel_has_an_expr(dashboard):
    for p in all_panels(dashboard):
        if p["type"] in ("row", "text"):
            continue
        exprs = [t.get("expr", "").strip() for t in p.get("targets", [])]
        assert any(exprs), f"panel {p['id']} {p.get('title')!r} has no target with an expr"


def test_dashboard_uses_only_exported_metrics(dashboard):
    used = set()
    for where, expr in queries(dashboard):
        names = exported.metric_names(expr)
        assert names, f"{where} uses no kvstash metric: {expr}"
        unknown = names - exported.series()
        assert not unknown, f"{where} uses metrics kvstash does not export: {sorted(unknown)}"
        assert not exported.recorded_names(expr), f"{where} depends on a recording rule; query raw metrics"
        used |= names
    assert len(used) >= 15, f"the dashboard covers only {sorted(used)}"


def test_dashboard_text_names_no_invented_metrics(dashboard):
    """Descriptions and text panels (e.g. the dedup placeholder) may name metrics only if they exist."""
    names = exported.metric_names(json.dumps(dashboard))
    unknown = names - exported.series() - set(exported.families())
    assert not unknown, f"the dashboard mentions metrics that do not exist: {sorted(unknown)}"


def test_rows(dashboard):
    rows = [p["title"] for p in dashboard["panels"] if p["type"] == "row"]
    assert rows == ROWS
    by_row, current = {}, None
    for p in dashboard["panels"]:
        if p["type"] == "row":
            current = p["title"]
            by_row[current] = list(p.get("panels", []))
        else:
            assert current is not None, f"panel {p['id']} sits above the first row"
            by_row[current].append(p)
    for title, panels in by_row.items():
        assert panels, f"row {title!r} is empty"
    def exprs(row):
        return " ".join(t["expr"] for p in by_row[row] for t in p.get("targets", []))

    assert "kvstash_tenant_tokens_total" in exprs("Tenants")
    for name in ("kvstash_prefix_lookups_total", "kvstash_prefix_hit_tokens_total", "kvstash_stored_blocks",
                 "kvstash_load_decisions_total", "kvstash_compression_ratio"):
        assert name in exprs("Compression and dedup"), name
    assert 'tier="host"' in exprs("Memory per tier") and 'tier="prefix_trie"' in exprs("Memory per tier")


def test_panel_ids_unique_and_layout_does_not_overlap(dashboard):
    panels = list(all_panels(dashboard))
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "duplicate panel ids"
    cells = {}
    for p in dashboard["panels"]:
        g = p["gridPos"]
        assert g["x"] >= 0 and g["x"] + g["w"] <= 24, f"panel {p['id']} is outside the 24-column grid"
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"panels {cells[(x, y)]} and {p['id']} overlap"
                cells[(x, y)] = p["id"]


def test_datasource_is_a_variable(dashboard):
    assert dashboard["title"] == "kvstash" and dashboard["uid"] == "kvstash"
    assert 36 <= dashboard["schemaVersion"] <= 41
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    assert "worker" in variables and "tenant" not in variables
    for p in all_panels(dashboard):
        if p["type"] in ("row", "text"):
            continue
        for ds in [p["datasource"]] + [t["datasource"] for t in p["targets"]]:
            assert ds == {"type": "prometheus", "uid": "${datasource}"}, f"panel {p['id']} has datasource {ds}"


def test_helm_chart_ships_the_same_dashboard():
    assert CHART_COPY.read_bytes() == DASHBOARD.read_bytes(), \
        "copy deploy/grafana/kvstash.json to helm/kvstash/dashboards/kvstash.json"


def test_rules_use_only_exported_or_recorded_series(rules):
    recorded = {r["record"] for r in rules if "record" in r}
    assert all(name.startswith("kvstash:") for name in recorded)
    for r in rules:
        where = r.get("record") or r.get("alert")
        unknown = exported.metric_names(r["expr"]) - exported.series()
        assert not unknown, f"rule {where} uses metrics kvstash does not export: {sorted(unknown)}"
        undefined = exported.recorded_names(r["expr"]) - recorded
        assert not undefined, f"rule {where} uses recorded series not defined in rules.yml: {sorted(undefined)}"


def test_alerts_are_complete(rules):
    alerts = {r["alert"]: r for r in rules if "alert" in r}
    assert {"KvstashQualityDrift", "KvstashHighRecomputeRate", "KvstashStorageDown", "KvstashNoWorkers",
            "KvstashRedisMemoryHigh"} <= set(alerts)
    for name, r in alerts.items():
        assert r.get("for"), f"{name} has no 'for'"
        assert r.get("labels", {}).get("severity") in ("warning", "critical"), f"{name} has no severity"
        for key in ("summary", "description"):
            assert r.get("annotations", {}).get(key), f"{name} has no {key} annotation"


def test_key_recording_rules_exist(rules):
    recorded = {r["record"] for r in rules if "record" in r}
    assert {"kvstash:ttft_seconds:p99_5m", "kvstash:recompute_ratio:rate5m",
            "kvstash:quality_attention_kl:mean10m"} <= recorded
