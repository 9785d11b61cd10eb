"""ModelRunner on the real SmolLM2 tokenizer and weights."""

import pytest
import torch

from services.config import KvstashConfig, ModelConfig
from services.errors import FailedPrecondition
from services.worker.model_runner import Detokenizer, ModelRunner, Sampling, pick_dtype
from services.worker.prepacked_linear import native_bf16_cpu
from tests.services.stack import smollm2_path

pytestmark = pytest.mark.model


@pytest.fixture(scope="module")
def runner():
    return ModelRunner(ModelConfig(), str(smollm2_path()))


def test_incremental_chat_equals_the_whole_conversation_rendered(runner):
    tok = runner.tokenizer
    q1 = [{"role": "user", "content": "What is the capital of Italy?"}]
    answer = tok("Rome is the capital.", add_special_tokens=False)["input_ids"]
    eos = min(runner.eos_ids)
    history = runner.encode_chat(q1, first=True, history=[]) + answer + [eos]
    q2 = [{"role": "user", "content": "And of Spain?"}]
    ids = history + runner.encode_chat(q2, first=False, history=history)
    whole = q1 + [{"role": "assistant", "content": "Rome is the capital."}] + q2
    expect = tok.apply_chat_template(whole, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
    assert ids == list(expect)


def test_a_resent_conversation_extends_its_session_exactly_as_resume_would(runner):
    """`encode_extension` (HTTP transparent continuation) adds the same tokens as `encode_chat` of the new
    turns (gRPC ResumeSession), and refuses a history the rendering does not begin with."""
    tok = runner.tokenizer
    q1 = [{"role": "user", "content": "What is the capital of Italy?"}]
    reply = "Rome is the capital."
    history = runner.encode_chat(q1, first=True, history=[]) + tok(reply, add_special_tokens=False)["input_ids"]
    history.append(min(runner.eos_ids))
    q2 = [{"role": "user", "content": "And of Spain?"}]
    whole = q1 + [{"role": "assistant", "content": reply}] + q2
    assert runner.encode_extension(whole, history) == runner.encode_chat(q2, first=False, history=history)
    cut = history[:-1]  # a reply cut off by max_tokens: the rendering closes it
    assert runner.encode_extension(whole, cut)[0] in runner.eos_ids
    spelled = runner.encode_chat(q1, first=True, history=[]) + [tok.convert_tokens_to_ids(c) for c in "Rome"]
    assert tok.decode(spelled[-4:]) == "Rome" and spelled != history[:len(spelled)]
    with pytest.raises(FailedPrecondition, match="differs"):  # same text, other tokens: not continued
        runner.encode_extension(whole, spelled)
    full = runner.encode_chat(whole, True, [])
    with pytest.raises(FailedPrecondition):  # nothing new to add
        runner.encode_extension(whole, full)


def test_cut_off_turn_is_closed(runner):
    q = [{"role": "user", "content": "Hi"}]
    history = runner.encode_chat(q, first=True, history=[]) + runner.encode_text("Hello there", first=False)
    delta = runner.encode_chat(q, first=False, history=history)
    assert delta[0] in runner.eos_ids  # the template's end-of-turn closes the cut-off reply


def test_sampling_is_seeded_and_top_p_keeps_the_argmax(runner):
    logits = torch.tensor([0.0, 5.0, 1.0, 0.5])
    assert ModelRunner.sample(logits, Sampling(), None) == 1
    s = Sampling(temperature=1.0, top_p=0.01, seed=3)
    assert all(ModelRunner.sample(logits, s, s.generator("cpu")) == 1 for _ in range(5))
    s = Sampling(temperature=2.0, seed=11)
    a = [ModelRunner.sample(logits, s, g) for g in [s.generator("cpu")] for _ in range(20)]
    b = [ModelRunner.sample(logits, s, g) for g in [s.generator("cpu")] for _ in range(20)]
    assert a == b and len(set(a)) > 1


def test_auto_dtype_is_bf16_where_products_run_natively_in_it():
    cpu = torch.device("cpu")
    assert pick_dtype("auto", cpu) == (torch.bfloat16 if native_bf16_cpu() else torch.float32)
    assert native_bf16_cpu()  # this machine (AMX): the default serves in bf16, on prepacked weights
    assert [pick_dtype(n, cpu) for n in ("float32", "bfloat16", "float16")] == [torch.float32, torch.bfloat16,
                                                                                torch.float16]
    with pytest.raises(ValueError, match="model.dtype='fp8'"):
        pick_dtype("fp8", cpu)
    with pytest.raises(ValueError, match="model.dtype"):
        KvstashConfig.from_dict({"model": {"dtype": "float64"}}).validate()


def test_greedy_picks_torchs_argmax_ties_and_nans_included():
    g = torch.Generator().manual_seed(0)
    rows = torch.randn(8, 49152, generator=g)
    rows[1, 7] = rows[1, 40000] = rows[1].max() + 1  # a tie: the first maximum wins
    rows[2, 123] = rows[2, 5] = float("nan")  # a NaN wins, the first one
    rows[3] = 0.0
    for row in [*rows, rows[:, 9], torch.randn(16, 49152, generator=g)[5]]:  # strided and row views too
        assert ModelRunner.sample(row, Sampling(), None) == int(torch.argmax(row))


def test_detokenizer_streams_whole_characters(runner):
    ids = runner.tokenizer("héllo wörld ✓ done", add_special_tokens=False)["input_ids"]
    d = Detokenizer(runner)
    assert "".join(d.push(i) for i in ids) == runner.decode(ids)


def test_fingerprint_is_stable_and_weight_sensitive():
    runner = ModelRunner(ModelConfig(dtype="float32"), str(smollm2_path()))  # plain weights: it can hash them again
    fp = runner.fingerprint
    assert fp == runner._fingerprint() and len(fp) == 64
    with torch.no_grad():
        runner.model.model.norm.weight[0] += 1
    try:
        assert runner._fingerprint() != fp
    finally:
        with torch.no_grad():
            runner.model.model.norm.weight[0] -= 1
