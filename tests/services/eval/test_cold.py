"""`kvstash eval cold`: a pass-through cold spec changes nothing (exactly), a lossy one costs fewer stored bits
and some KL, and every reported field is there."""

import json
import subprocess
import sys

from tests.services.stack import REPO


def test_eval_cold_identity_is_exact_and_lossy_specs_store_fewer_bits(tiny_model_dir, tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("A short text about rivers, valleys and the mountains around them. " * 80)
    out = subprocess.run([sys.executable, "-m", "services.cli.main", "--log-level", "ERROR", "eval", "cold",
                          "--model", str(tiny_model_dir), "--text", str(text), "--kv", "int4:k8v4:g32:gv16:r32",
                          "--cold", "int:k16v16:g64:gv16,int:k3v2:g64:gv16:s1,int:k3v2:g64:gv16:s1:qk", "--history", "320",
                          "--continuation", "32", "--windows", "1", "--prefill-chunk", "64", "--json"],
                         cwd=REPO, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    same, lossy, weighted = (json.loads(line) for line in out.stdout.strip().splitlines()[-3:])
    for r in (same, lossy, weighted):
        for key in ("ppl_base", "ppl", "delta_ppl", "kl", "top1_agreement", "bits_per_element",
                    "stored_bits_per_element", "stored_device_bits_per_element"):
            assert isinstance(r[key], float), key
    assert same["delta_ppl"] == 0.0 and same["kl"] == 0.0 and same["top1_agreement"] == 1.0  # pass-through
    assert 0 < lossy["stored_bits_per_element"] < lossy["stored_device_bits_per_element"]
    assert lossy["kl"] > 0.0
    assert weighted["spec"].endswith(":qk") and weighted["kl"] > 0.0  # the model's key weights, in both measures
    assert 0 < weighted["stored_bits_per_element"] != lossy["stored_bits_per_element"]
    assert weighted["bits_per_element"] != lossy["bits_per_element"]


def test_eval_cold_sensitivity_scans_every_layer_side_and_bits_from_an_exact_floor(tiny_model_dir, tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("A short text about rivers, valleys and the mountains around them. " * 80)
    out = subprocess.run([sys.executable, "-m", "services.cli.main", "--log-level", "ERROR", "eval", "cold",
                          "--model", str(tiny_model_dir), "--text", str(text), "--kv", "int4:k8v4:g32:gv16:r32",
                          "--cold", "int:k3v2:g64:gv16:s1:clipv", "--history", "320", "--continuation", "16",
                          "--windows", "1", "--prefill-chunk", "64", "--sensitivity", "--json"],
                         cwd=REPO, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = [json.loads(line) for line in out.stdout.strip().splitlines()]
    floor, scan = rows[0], rows[1:]
    assert floor["row"] == "floor" and floor["kl"] == 0.0  # no sinks, a 16-bit window: everything passed through
    layers = {r["layer"] for r in scan}
    assert len(scan) == 5 * len(layers) and layers == set(range(len(layers)))
    assert {(r["side"], r["bits"]) for r in scan} == {("k", 2), ("k", 3), ("k", 4), ("v", 2), ("v", 3)}
    assert all(r["kl"] >= 0.0 for r in scan) and max(r["kl"] for r in scan) > 0.0
