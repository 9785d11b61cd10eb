"""The real-scrape test: Debian's `prometheus` server scrapes a running kvstash (with the shipped rules)
and a metric comes back through the Prometheus HTTP API."""

import json
import shutil
import socket
import subprocess
import time
import urllib.parse
import urllib.request

import pytest
import yaml

from services.client import KvstashClient
from tests.services.stack import REPO

pytestmark = pytest.mark.e2e


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _query(port: int, q: str) -> list:
    url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": q})
    with urllib.request.urlopen(url, timeout=5) as r:
        body = json.load(r)
    assert body["status"] == "success", body
    return body["data"]["result"]


def test_prometheus_scrapes_kvstash(tiny_stack, tmp_path):
    prom = shutil.which("prometheus")
    assert prom, "prometheus is not installed: apt-get install -y prometheus (scripts/setup.sh does)"
    with KvstashClient(tiny_stack.target, timeout=120) as c:
        c.generate("scrape me", max_new_tokens=3)
    metrics_port = urllib.parse.urlparse(tiny_stack.metrics_url).port
    cfg = yaml.safe_load((REPO / "deploy/prometheus/prometheus.yml").read_text())
    cfg["global"]["scrape_interval"] = cfg["global"]["evaluation_interval"] = "1s"
    for job in cfg["scrape_configs"]:
        job["scrape_interval"] = "1s"
        job["static_configs"] = [{"targets": [f"127.0.0.1:{metrics_port}"]}]
    cfg["rule_files"] = [str(REPO / "deploy/prometheus/rules.yml")]
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(cfg))
    port = _free_port()
    with open(tmp_path / "prometheus.log", "wb") as log:  # the child holds its own descriptor
        proc = subprocess.Popen([prom, f"--config.file={tmp_path / 'prometheus.yml'}",
                                 f"--storage.tsdb.path={tmp_path / 'data'}", f"--web.listen-address=127.0.0.1:{port}"],
                                stdout=subprocess.DEVNULL, stderr=log)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                workers = _query(port, "kvstash_workers")
                generated = _query(port, "sum(kvstash_generated_tokens_total)")
                if workers and generated and float(generated[0]["value"][1]) >= 3:
                    break
            except OSError:
                pass
            assert proc.poll() is None, (tmp_path / "prometheus.log").read_text()[-2000:]
            assert time.monotonic() < deadline, (tmp_path / "prometheus.log").read_text()[-2000:]
            time.sleep(0.5)
        assert float(workers[0]["value"][1]) == 2  # the tiny stack runs two workers
        assert {r["metric"].get("job") for r in workers} == {"kvstash-gateway"}
    finally:
        proc.terminate()
        proc.wait(timeout=20)
