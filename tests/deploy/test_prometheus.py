"""deploy/prometheus passes promtool: the config, the rules, and the rules' unit tests (rules_test.yml); the
Grafana dashboard's queries are valid PromQL.

promtool comes from Debian's `prometheus` package. Without it these tests fail, never skip.
"""

import json
import shutil
import subprocess

import pytest
import yaml

from tests.deploy.exported import REPO

PROM = REPO / "deploy" / "prometheus"


def promtool(*args: str) -> subprocess.CompletedProcess:
    path = shutil.which("promtool")
    if path is None:
        pytest.fail("promtool not found on PATH: apt-get install -y prometheus", pytrace=False)
    return subprocess.run([path, *args], capture_output=True, text=True, timeout=120, cwd=REPO)


@pytest.mark.parametrize("args", [
    ("check", "config", "deploy/prometheus/prometheus.yml"),
    ("check", "rules", "deploy/prometheus/rules.yml"),
    ("test", "rules", "deploy/prometheus/rules_test.yml"),
], ids=["check-config", "check-rules", "test-rules"])
def test_promtool(args):
    res = promtool(*args)
    assert res.returncode == 0, f"promtool {' '.join(args)} exited {res.returncode}:\n{res.stdout}\n{res.stderr}"


def test_dashboard_queries_are_valid_promql(tmp_path):
    """Every panel query parses: each becomes a recording rule (Grafana's variables replaced by plain values)
    in a scratch rules file that `promtool check rules` must accept."""
    dash = json.loads((REPO / "deploy" / "grafana" / "kvstash.json").read_text())
    subst = {"$__rate_interval": "1m", "$worker": ".*", "$method": ".*"}
    rules = []
    for p in dash["panels"]:
        for t in p.get("targets", []):
            expr = t["expr"]
            for var, value in subst.items():
                expr = expr.replace(var, value)
            assert "$" not in expr, f"panel {p['id']} uses an unknown variable: {t['expr']}"
            rules.append({"record": f"dashboard:panel_{p['id']}_{t['refId']}", "expr": expr})
    assert len(rules) > 20
    path = tmp_path / "dashboard_rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    res = promtool("check", "rules", str(path))
    assert res.returncode == 0, f"a dashboard query does not parse:\n{res.stdout}\n{res.stderr}"
