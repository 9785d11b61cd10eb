"""`kvstash eval ppl`: a harness that can fail (exact zero for fp, exact bit accounting, real-model bounds)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from kvstore.config import QuantConfig
from services.config import ModelConfig
from services.eval.ppl import evaluate_ppl
from services.worker.model_runner import ModelRunner
from tests.services.stack import REPO, smollm2_path

WIKI = REPO.parent / "shared" / "data" / "wiki.test.raw"


@pytest.fixture(scope="module")
def tiny_runner(tiny_model_dir):
    return ModelRunner(ModelConfig(name=str(tiny_model_dir), dtype="float32"), str(tiny_model_dir))  # eval ppl's --dtype


def _ids(runner, n):
    text = "The history of printing begins in East Asia. " * 60
    return runner.tokenizer(text, add_special_tokens=False)["input_ids"][:n]


def test_fp_against_fp_is_exactly_zero(tiny_runner):
    r = evaluate_ppl(tiny_runner, _ids(tiny_runner, 300), QuantConfig.parse("fp"), window=150, chunk=16)
    assert r.delta_ppl == 0.0 and r.kl == 0.0 and r.top1_agreement == 1.0
    assert r.bits_per_element == 0.0 and r.bits_per_element_total == 32.0  # float32 model: nothing quantized


def test_bit_accounting_is_exact(tiny_runner):
    # head_dim 16: keys 4-bit codes + 32 bits of fp16 scale/zero per 32 tokens = 5 bits; values
    # 4 bits + 32 bits per 16 channels = 6 bits; mean 5.5 bits per quantized element.
    r = evaluate_ppl(tiny_runner, _ids(tiny_runner, 257), QuantConfig.parse("int4:g32:gv16:r0"), window=257, chunk=32)
    assert r.bits_per_element == pytest.approx(5.5, abs=1e-12)
    assert r.bits_per_element_total == pytest.approx(5.5, abs=1e-12)  # 256 tokens fed: all sealed
    part = evaluate_ppl(tiny_runner, _ids(tiny_runner, 241), QuantConfig.parse("int4:g32:gv16:r0"), window=241, chunk=32)
    # 240 tokens fed: 224 sealed at 5.5 bits, 16 unsealed in float32
    assert part.bits_per_element_total == pytest.approx((224 * 5.5 + 16 * 32) / 240, abs=1e-9)
    assert r.kl > 0 and r.top1_agreement < 1.0 and r.ppl != r.ppl_ref


def test_cli_json_has_every_field(tiny_model_dir, tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("A short text about rivers and mountains. " * 40)
    out = subprocess.run([sys.executable, "-m", "services.cli.main", "--log-level", "ERROR", "eval", "ppl",
                          "--model", str(tiny_model_dir), "--text", str(text), "--kv", "int8", "--tokens", "200",
                          "--window", "100", "--json"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    d = json.loads(out.stdout.strip().splitlines()[-1])
    for key in ("ppl_ref", "ppl", "delta_ppl", "kl", "top1_agreement", "bits_per_element", "bits_per_element_total"):
        assert isinstance(d[key], float), key


@pytest.mark.model
def test_smollm2_int8_is_near_lossless_and_int2_is_not():
    assert WIKI.exists(), f"shared data missing: {WIKI}"
    runner = ModelRunner(ModelConfig(), str(smollm2_path()))
    ids = runner.tokenizer(Path(WIKI).read_text(encoding="utf-8")[:20000], add_special_tokens=False)["input_ids"][:512]
    int8 = evaluate_ppl(runner, ids, QuantConfig.parse("int8:g32:gv32:r0"), window=512, chunk=32)
    assert abs(int8.delta_ppl) / int8.ppl_ref < 0.01 and int8.top1_agreement > 0.97  # stated bound: <1% PPL
    int2 = evaluate_ppl(runner, ids, QuantConfig.parse("int2:g32:gv32:r0"), window=512, chunk=32)
    assert int2.kl > 10 * int8.kl and int2.ppl > int8.ppl


def test_hf_baseline_runs_on_the_same_tokens(tiny_runner):
    from services.eval.ppl import Evaluator

    ev = Evaluator(tiny_runner, _ids(tiny_runner, 200), window=100, chunk=16)
    ours = ev.spec(QuantConfig.parse("int4:g32:gv16:r0"))
    hf = ev.hf("hf-hqq", QuantConfig.parse("int4:g32:gv16:r0"))
    assert hf.ppl_ref == ours.ppl_ref  # one reference pass serves both
    assert hf.spec == "hf-hqq:int4:g32:r0" and hf.bits_per_element == 4 + 32 / 32
    assert 0 < hf.kl < 1 and hf.ppl != hf.ppl_ref


def test_fp8_baseline_stores_every_element_in_8_bits(tiny_runner):
    """vLLM's FP8 KV (e4m3, one scale per layer and side) through transformers' fp8 QuantizedCache backend."""
    from services.eval.ppl import Evaluator

    ev = Evaluator(tiny_runner, _ids(tiny_runner, 200), window=100, chunk=16)
    fp8 = ev.hf("hf-fp8", QuantConfig.parse("int4:g32:gv16:r0"))
    assert fp8.spec == "hf-fp8" and fp8.bits_per_element == fp8.bits_per_element_total == 8
    assert 0 < fp8.kl < 1 and fp8.ppl != fp8.ppl_ref  # lossy from the second chunk on
