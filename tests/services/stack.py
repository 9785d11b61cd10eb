"""Test support: a tiny random-init model folder, and `kvstash up` run as a real subprocess."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from services.runtime.process import ServiceProcess  # noqa: F401  (tests import it from here)
from services.worker.model_store import DEFAULT_MODEL, store_for

REPO = Path(__file__).resolve().parents[2]


def smollm2_path() -> Path:
    """The pulled default model; setup pulls it, so its absence is a failure, not a skip."""
    return Path(store_for().resolve(DEFAULT_MODEL))


def make_tiny_model(dest: Path) -> Path:
    """A random-init 2-layer Llama with SmolLM2's tokenizer and chat template (fast, diverse greedy output)."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(smollm2_path())
    torch.manual_seed(1234)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=4096,
                      initializer_range=0.3, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      tie_word_embeddings=True)
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(dest)
    tok.save_pretrained(dest)
    return dest


def descendants(pid: int) -> list[int]:
    """Every process below `pid` (the gateway's Ray processes and worker actors), from /proc."""
    children: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(d.name))
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def copy_model(src: Path, dest: Path) -> Path:
    shutil.copytree(src, dest)
    return dest
