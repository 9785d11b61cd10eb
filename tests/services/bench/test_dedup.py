"""`kvstash bench dedup` on real SmolLM2 sessions, a real redis-server and a real Redis Cluster, with each
session's own part shorter than the full-precision window (the case where the shared prefix reaches into the
window and tail, which once made `unique_bytes` negative): unique content is positive, never above what the
sessions would hold stored alone, and exactly what Redis holds when one tenant shares its prefix."""

import argparse
import json

import pytest

from services.bench.dedup import run_dedup
from services.eval.corpus import DEFAULT_TEXT


@pytest.mark.timeout(1500)  # four engines (two scenarios x one node and a Cluster): slow on a shared CPU
def test_unique_bytes_count_what_is_stored_when_the_own_part_is_shorter_than_the_window(capsys):
    args = argparse.Namespace(model="smollm2-135m-instruct", text=str(DEFAULT_TEXT), kv="int4:k8v4:g32:r128",
                              sessions=2, prefix=192, own=16, scenarios="one-tenant,private-tenants",
                              block_tokens=32, redis_url="", cluster=True, json=True)
    assert run_dedup(args) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["restores_exact"]
    rows = {(r["redis"], r["scenario"]): r for r in out["rows"]}
    assert set(rows) == {(w, s) for w in ("single", "cluster") for s in ("one-tenant", "private-tenants")}
    for r in rows.values():
        assert 0 < r["unique_bytes"] < r["separate_bytes"], r
        assert r["shared_bytes"] > 0, r  # sealed prefix blocks are listed by every session
    for where in ("single", "cluster"):
        one, private = rows[(where, "one-tenant")], rows[(where, "private-tenants")]
        assert one["redis_bytes"] == one["unique_bytes"], one  # one tenant: each block stored once, exactly
        assert private["redis_bytes"] == private["separate_bytes"], private  # private salts share nothing
        assert private["redis_over_unique"] > 1  # each private tenant holds its own copy of the prefix
    assert rows[("single", "one-tenant")]["redis_bytes"] == rows[("cluster", "one-tenant")]["redis_bytes"]
