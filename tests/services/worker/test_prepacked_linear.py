"""Prepacked bf16 linear layers (services/worker/prepacked_linear.py) on the real SmolLM2 weights.

- Prepacking replaces every plain linear layer, keeps a tied lm_head's weight and drops the others' plain
  weights; hooks on a projection still fire.
- A prepacked layer is deterministic and computes the product of its weight (within bf16 rounding of
  `F.linear`'s).
- The runner names the kernel in its fingerprint (bf16 only: an fp32 runner, and its fingerprint, are
  untouched by the setting), and the worker's bucket shapes and packed prefill sizes stay batch-invariant
  through the prepacked kernels, so batched decode and exact resume keep working on them.
"""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from kvstore.config import QuantConfig
from services.config import DEFAULT_KV_SPEC, ModelConfig
from services.worker.batching import check_invariance, check_packed_invariance
from services.worker.model_runner import ModelRunner
from services.worker.prepacked_linear import KERNEL, PrepackedLinear, can_prepack, prepack_linears
from tests.services.stack import smollm2_path

pytestmark = pytest.mark.model


@pytest.fixture(scope="module")
def runners():
    path = str(smollm2_path())
    return {k: ModelRunner(ModelConfig(dtype="bfloat16", prepack_weights=k), path) for k in (True, False)}


def test_this_machine_prepacks_bf16_only():
    """The CI machine has oneDNN and native bf16 products (AVX512-BF16 / AMX): the prepacked path is tested."""
    assert can_prepack(nn.Linear(8, 8).to(torch.bfloat16))
    assert not can_prepack(nn.Linear(8, 8)) and not can_prepack(nn.Linear(8, 8).to(torch.float16))


def test_prepacking_replaces_the_linears_and_keeps_only_shared_weights():
    torch.manual_seed(0)
    emb = nn.Embedding(50, 16)
    head = nn.Linear(16, 50, bias=False)
    head.weight = emb.weight  # tied, as SmolLM2's lm_head
    model = nn.ModuleDict({"emb": emb, "proj": nn.Linear(16, 24), "head": head}).to(torch.bfloat16)
    x = torch.randn(5, 16, dtype=torch.bfloat16)
    want = {name: F.linear(x, model[name].weight, model[name].bias) for name in ("proj", "head")}
    seen = []
    assert prepack_linears(model) == 2
    model["proj"].register_forward_hook(lambda m, i, o: seen.append(o.shape))
    assert isinstance(model["proj"], PrepackedLinear) and not hasattr(model["proj"], "weight")
    assert model["head"].weight is emb.weight  # tied: kept (callers read the vocabulary size from it)
    with torch.inference_mode():
        for name, ref in want.items():
            got = model[name](x)
            assert torch.equal(got, model[name](x))  # deterministic
            assert got.shape == ref.shape and (got.float() - ref.float()).abs().max() <= 0.02 * ref.abs().max()
        assert model["proj"](x.view(1, 5, 16)).shape == (1, 5, 24)  # leading dims kept
    assert seen == [torch.Size([5, 24])] * 2 + [torch.Size([1, 5, 24])]


def test_the_runner_names_the_kernel_in_its_fingerprint(runners):
    packed, plain = runners[True], runners[False]
    assert packed.linears == KERNEL and plain.linears == "torch"
    assert packed.fingerprint != plain.fingerprint  # KV of one kernel is never loaded under the other
    assert isinstance(packed.model.model.layers[0].mlp.down_proj, PrepackedLinear)
    assert packed.vocab_size == plain.vocab_size
    path = str(smollm2_path())
    fp32 = [ModelRunner(ModelConfig(dtype="float32", prepack_weights=k), path) for k in (True, False)]
    assert [r.linears for r in fp32] == ["torch", "torch"] and fp32[0].fingerprint == fp32[1].fingerprint


def test_prepacked_passes_are_deterministic_and_close_to_plain_ones(runners):
    quant = QuantConfig.parse(DEFAULT_KV_SPEC)
    ids = list(range(1000, 1060))
    logits = {}
    for k, r in runners.items():
        a, b = r.new_cache(quant), r.new_cache(quant)
        la, lb = r.forward(a, ids), r.forward(b, ids)
        assert torch.equal(la, lb) and a.export_state().equals(b.export_state())
        logits[k] = la
    assert logits[True].argmax() == logits[False].argmax()
    assert (logits[True] - logits[False]).abs().max() < 0.5


@pytest.mark.parametrize("seed", [1, 2])
def test_buckets_and_packed_prefill_stay_batch_invariant_through_prepacked_kernels(runners, seed):
    quant = QuantConfig.parse(DEFAULT_KV_SPEC)
    runner = runners[True]
    assert check_invariance(runner, quant, (2, 4, 8, 16, 32), trials=4, seed=seed) == []
    assert check_packed_invariance(runner, quant, (128, 512), trials=3, seed=seed) == []
