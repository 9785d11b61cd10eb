"""The text that evaluations and benchmarks read, and its token ids.

Imports nothing of kvstash: both services/eval and services/bench import it, and it imports neither.
"""

from __future__ import annotations

from pathlib import Path

_REPO = Path(__file__).resolve().parents[2]
_SHARED = Path("shared") / "data" / "wiki.test.raw"
# WikiText-2 raw test, in shared/data beside the checkout (or beside an ancestor of it: a git worktree under
# a folder of worktrees finds the same copy); the path beside the checkout when there is none
DEFAULT_TEXT = next((p / _SHARED for p in _REPO.parents if (p / _SHARED).is_file()), _REPO.parent / _SHARED)


def load_ids(runner, path: str, tokens: int) -> list[int]:
    """The first `tokens` token ids of the UTF-8 text at `path`, tokenized as the worker tokenizes a session's first
    text (`runner.encode_text(text, first=True)`: BOS prepended iff the tokenizer adds one); exits if it has fewer."""
    text = Path(path).read_text(encoding="utf-8")
    ids = runner.encode_text(text[: tokens * 16], first=True)[:tokens]
    if len(ids) < tokens:
        raise SystemExit(f"{path} has only {len(ids)} tokens, fewer than --tokens {tokens}")
    return ids
