"""`load_ids`: evals tokenize a text exactly as the worker tokenizes a session's first text (BOS iff it adds one)."""

import pytest

from services.config import ModelConfig
from services.eval.corpus import load_ids
from services.worker.model_runner import ModelRunner
from tests.services.stack import smollm2_path

TEXT = "The history of printing begins in East Asia. " * 40


@pytest.fixture(scope="module")
def runners(tiny_model_dir):
    path = smollm2_path()
    return [ModelRunner(ModelConfig(name=str(d)), str(d)) for d in (tiny_model_dir, path)]


def test_load_ids_is_the_workers_first_text_tokenization(runners, tmp_path):
    src = tmp_path / "t.txt"
    src.write_text(TEXT, encoding="utf-8")
    for runner in runners:
        ids = load_ids(runner, str(src), 32)
        assert ids == runner.encode_text(TEXT, first=True)[:32]
        plain = runner.tokenizer(TEXT, add_special_tokens=False)["input_ids"]
        adds_bos = runner.tokenizer("x", add_special_tokens=True)["input_ids"][:1] == [runner.tokenizer.bos_token_id]
        assert (ids[0] == runner.tokenizer.bos_token_id and ids[1:] == plain[:31]) if adds_bos else ids == plain[:32]


def test_too_short_text_exits(runners, tmp_path):
    src = tmp_path / "s.txt"
    src.write_text("short", encoding="utf-8")
    with pytest.raises(SystemExit):
        load_ids(runners[0], str(src), 10_000)
