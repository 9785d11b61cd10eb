"""`kvstash bench bound`: the report's fields and arithmetic on the real model, never its times."""

import json
from types import SimpleNamespace

import pytest

from services.bench.bound import bound, run_bound


def test_the_bound_is_the_ratio_of_the_best_throughputs():
    t = {"decode1": 0.03, "decodeS": 0.06, "prompt": 0.1, "packed": 0.5}
    b = bound(t, sessions=16, prompt=64, new=32, pack=512)
    assert b["one_tokens_per_s"] == pytest.approx(32 / (0.1 + 32 * 0.03))
    assert b["many_tokens_per_s"] == pytest.approx(16 * 32 / (16 * 64 * 0.5 / 512 + 32 * 0.06))
    assert b["bound"] == pytest.approx(b["many_tokens_per_s"] / b["one_tokens_per_s"])
    # passes that cost the same for 16 rows as for 1 make the bound grow with the answer's length
    flat = dict(t, decodeS=0.03)
    assert bound(flat, 16, 64, 320, 512)["bound"] > bound(flat, 16, 64, 32, 512)["bound"]


@pytest.mark.parametrize(("dtype", "linears"), [("float32", "torch"), ("bfloat16", "prepacked")])
def test_one_report_from_timed_passes(capsys, dtype, linears):
    args = SimpleNamespace(model="smollm2-135m-instruct", dtype=dtype, sessions=2, prompt_tokens=8, new_tokens=4,
                           pack=16, reps=1, json=True, linears=linears)
    assert run_bound(args) == 0
    row = json.loads(capsys.readouterr().out)
    assert row["dtype"] == dtype and row["linears"] == linears
    t = {k: row[f"t_{k}_s"] for k in ("decode1", "decodeS", "prompt", "packed")}
    assert all(v > 0 for v in t.values())
    assert row["bound"] == pytest.approx(bound(t, 2, 8, 4, 16)["bound"])


def test_fp32_linears_are_not_prepacked():
    args = SimpleNamespace(model="smollm2-135m-instruct", dtype="float32", sessions=2, prompt_tokens=8, new_tokens=4,
                           pack=16, reps=1, json=True, linears="prepacked")
    with pytest.raises(SystemExit, match="not prepacked"):
        run_bound(args)
