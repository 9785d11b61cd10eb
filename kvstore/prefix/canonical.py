"""Where a new session may adopt a stored prefix: which KV is reproducible from tokens alone.

On CPU (and GPU) a forward pass's bits depend on its length: the same position run in a pass of 1,000 or
1,001 tokens gives different rounding. So KV is a function of the tokens *and the pass structure*. The
worker runs every prefill in passes that end at multiples of `prefill_chunk` (global positions), and
calls the first complete passes from position 0 the *canonical* part of a history: any session whose
prompt starts with the same tokens computes bit-identical KV for it (same model, spec, device kind —
the `KvDomain`), whenever it seals those tokens. The canonical passes themselves (`passes`,
`canonical_tokens`, `adopted_schedule`) are schedule vocabulary, in kvstore/schedule.py.

A new session may adopt a stored canonical prefix of S tokens (S a multiple of `prefill_chunk` and a
block boundary) instead of prefilling it. It then holds those tokens sealed, with an empty window — the
state `QuantizedKVCache.seal_all` leaves after the canonical passes — and records exactly that in its
schedule: `S / prefill_chunk` passes of `prefill_chunk`, then SEAL. Replaying the schedule from the
tokens rebuilds the same bits, so adoption never costs exactness.

Invariants (pure functions):
- `adoption_points(...)` are increasing, each a multiple of chunk and a block boundary, each < n_tokens.
"""

from __future__ import annotations

from kvstore.prefix.block_hash import BlockGrid


def adoption_points(n_tokens: int, grid: BlockGrid, chunk: int) -> list[int]:
    """Prefix lengths S a session with `n_tokens` tokens may adopt (at least one token is left to run)."""
    if chunk % grid.block_tokens:
        raise ValueError(f"prefill chunk {chunk} is not a multiple of block_tokens={grid.block_tokens}")
    return [s for s in range(chunk, n_tokens, chunk) if s > grid.sinks and (s - grid.sinks) % grid.block_tokens == 0]
