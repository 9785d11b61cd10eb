"""The text that evaluations and benchmarks read, and its token ids.

Imports nothing of kvstash: both services/eval and services/bench import it, and it imports neither.
"""

from __future__ import annotations

from pathlib import Path

DEFAULT_TEXT = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "wiki.test.raw"


def load_ids(runner, path: str, tokens: int) -> list[int]:
    """The first `tokens` token ids of the UTF-8 text at `path` (no special tokens); exits if it has fewer."""
    text = Path(path).read_text(encoding="utf-8")
    ids = runner.tokenizer(text[: tokens * 16], add_special_tokens=False)["input_ids"][:tokens]
    if len(ids) < tokens:
        raise SystemExit(f"{path} has only {len(ids)} tokens, fewer than --tokens {tokens}")
    return ids
