"""The text that evaluations and benchmarks read, and its token ids.

Imports nothing of kvstash: both services/eval and services/bench import it, and it imports neither.
"""

from __future__ import annotations

from pathlib import Path

DEFAULT_TEXT = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "wiki.test.raw"


def load_ids(runner, path: str, tokens: int) -> list[int]:
    """The first `tokens` token ids of the UTF-8 text at `path`, tokenized as the worker tokenizes a session's first
    text (`runner.encode_text(text, first=True)`: BOS prepended iff the tokenizer adds one); exits if it has fewer."""
    text = Path(path).read_text(encoding="utf-8")
    ids = runner.encode_text(text[: tokens * 16], first=True)[:tokens]
    if len(ids) < tokens:
        raise SystemExit(f"{path} has only {len(ids)} tokens, fewer than --tokens {tokens}")
    return ids
