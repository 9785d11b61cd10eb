"""`kvstash bench resume --reps 0` on a real SmolLM2 session and a real redis-server: whole-session sizes
and the bench's own bit-exactness check of the restore, nothing timed; with `--cold` the same session is
also stored in cold mode, whole (cold blocks + lossless tail + manifest), and is smaller than lossless."""

import argparse
import json

from services.bench.resume import run_resume
from services.eval.corpus import DEFAULT_TEXT

COLD = "int:k3v2:g128:gv64:s1:hadv"


def test_sizes_only_with_cold_mode(capsys):
    args = argparse.Namespace(model="smollm2-135m-instruct", dtype="float32", history="400", text=str(DEFAULT_TEXT),
                              kv="int4:k8v4:g32:r128,int4:k8v4:g32:r128:w8", reps=0, redis_url="", cluster=False,
                              cold=COLD, json=True)
    assert run_resume(args) == 0
    rows = {r["kv"]: r for r in json.loads(capsys.readouterr().out)}
    for r in rows.values():
        assert "restore_s" not in r and r["blocks"] > 0  # nothing timed; restore asserted exact by the bench
        assert 0 < r["cold_redis_bytes_per_session"] < r["redis_bytes_per_session"], r
        assert 0 < r["cold_redis_fraction_of_16bit"] < r["redis_fraction_of_16bit"] < 1, r
    w16, w8 = rows["int4:k8v4:g32:r128"], rows["int4:k8v4:g32:r128:w8"]
    assert w8["redis_bytes_per_session"] < w16["redis_bytes_per_session"]  # the INT8 window stores smaller
    assert w8["device_bytes_per_token"] < w16["device_bytes_per_token"]
