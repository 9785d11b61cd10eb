"""`kvstash bench decode` on the real model: one row per (context, rows, spec), the batched rows through
`forward_rows` beside a DynamicCache batch; checks the report's shape, never its times."""

import json
from types import SimpleNamespace

from services.bench.decode import run_decode


def test_one_row_per_context_row_count_and_spec(capsys):
    args = SimpleNamespace(model="smollm2-135m-instruct", context="20", rows="1,3", steps=1, reps=1, json=True,
                           kv="int:k4v3:g16:gv64:r8:w8:s4,int4:g16:r16:hadv:hadattn")
    assert run_decode(args) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(r["rows"], r["kv"]) for r in rows] == [(n, k) for n in (1, 3) for k in args.kv.split(",")]
    for r in rows:
        assert r["step_s"] > 0 and r["dynamic_step_s"] > 0
        assert r["per_row_s"] == r["step_s"] / r["rows"]
        assert r["ratio_vs_dynamic"] == r["step_s"] / r["dynamic_step_s"]
