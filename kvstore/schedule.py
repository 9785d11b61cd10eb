"""The schedule: how a session's KV was built, one entry per forward pass, so that replaying it rebuilds
the KV bit for bit.

On CPU (and GPU) a forward pass's bits depend on its shape: the same token run in a pass of 1,000 or 1,001
tokens, or in a batch of 1 or 16 rows, rounds differently. With a fixed shape they do not depend on what
the other rows hold (batch invariance; `services/worker/batching.py` checks it at start). So a session's
KV is a function of its tokens and of the shape of every pass that fed them, and the schedule records
exactly that shape:

- `Pass(tokens=n, rows=1)`: a pass of the session's own, `n` consecutive tokens in one sequence
  (`input_ids` of shape [1, n]): prefill chunks, and decode steps run alone.
- `Pass(tokens=n, rows=R)`, R >= 2: `n` consecutive tokens of the session as `n` of the `R` rows of a
  batched pass of shape [R, 1] (each row one token; the other rows are other sessions or padding, and
  do not change this session's bits). A live decode step has n = 1; replay may run up to R consecutive
  entries of the same R as one pass whose rows are all this session's.
- `Pass(tokens=n, rows=R, packed=True)`: `n` consecutive tokens of the session as one *segment* of a
  packed prefill pass of shape [1, R] (several sessions' prompt tails side by side, padding after them):
  row-wise ops run on all R rows, and the segment attends causally over its own cache as a pass of its
  own would (`kvstore.quant.segments`). Replay runs it alone in a pass of R rows; it never merges with
  other entries. R is a multiple of 16.
- `SEAL`: seal the whole window now (the session adopted a stored prefix here; kvstore/prefix).

Stored as uint32 values (run-length encoded by the manifest): `tokens | (rows - 1) << 24`, SEAL = 0; a
packed pass is `tokens | PACKED | (rows / 16 - 1) << 24`, PACKED = 1 << 23. A pass of rows = 1 is its token
count, as before batching existed (no stored pass ever fed 2^23 tokens, so old schedules read the same).

Canonical passes: the worker runs every prefill in passes that end at multiples of `prefill_chunk` (global
positions), and calls the first complete passes from position 0 the *canonical* part of a history: any
session whose prompt starts with the same tokens computes bit-identical KV for it, so a stored canonical
prefix may be adopted (kvstore/prefix/canonical.py says where; `adopted_schedule` is what the adopter
records: the canonical passes, then SEAL).

Invariants (pure functions):
- `decode_pass(encode_pass(p)) == p` for every valid pass; `encode_pass` raises ValueError otherwise.
- `schedule_tokens(s)` = the tokens the schedule's passes fed; `boundaries(s)` its prefix sums (with 0).
- `canonical_tokens(schedule, chunk)` = chunk * (number of leading schedule entries equal to chunk).
- `passes(start, end, chunk)` covers [start, end) with passes ending at multiples of chunk (and at end).
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import accumulate

SEAL = 0  # schedule entry: seal the whole window (a stored prefix was adopted here)
ROWS_SHIFT = 24
PACKED = 1 << 23  # schedule entry flag: a segment of a packed prefill pass
MAX_PASS_TOKENS = PACKED - 1  # 8,388,607 tokens in one pass
MAX_ROWS = 1 << (32 - ROWS_SHIFT)  # 256 rows in one batched pass
PACKED_UNIT = 16  # a packed pass has a multiple of 16 rows
MAX_PACKED_ROWS = PACKED_UNIT * MAX_ROWS  # 4,096 rows in one packed pass


@dataclass(frozen=True)
class Pass:
    """One forward pass of a session: `tokens` consecutive tokens, in a pass of `rows` rows (1: its own);
    `packed`: as one segment of a packed prefill pass of `rows` rows."""

    tokens: int
    rows: int = 1
    packed: bool = False

    @property
    def batched(self) -> bool:
        return self.rows > 1 and not self.packed


def encode_pass(p: Pass) -> int:
    """The schedule entry (uint32) of pass `p`; ValueError if it cannot be one."""
    if not 1 <= p.tokens <= MAX_PASS_TOKENS:
        raise ValueError(f"a pass feeds 1..{MAX_PASS_TOKENS} tokens, not {p.tokens}")
    if p.packed:
        if not (PACKED_UNIT <= p.rows <= MAX_PACKED_ROWS and p.rows % PACKED_UNIT == 0):
            raise ValueError(f"a packed pass has a multiple of {PACKED_UNIT} rows up to {MAX_PACKED_ROWS}, not {p.rows}")
        if p.tokens > p.rows:
            raise ValueError(f"a packed pass of {p.rows} rows cannot feed {p.tokens} tokens of one session")
        return p.tokens | PACKED | (p.rows // PACKED_UNIT - 1) << ROWS_SHIFT
    if not 1 <= p.rows <= MAX_ROWS:
        raise ValueError(f"a pass has 1..{MAX_ROWS} rows, not {p.rows}")
    if p.rows > 1 and p.tokens > p.rows:
        raise ValueError(f"a batched pass of {p.rows} rows cannot feed {p.tokens} tokens of one session")
    return p.tokens | (p.rows - 1) << ROWS_SHIFT


def decode_pass(entry: int) -> Pass | None:
    """The pass an entry records, or None for SEAL; ValueError for a value no pass encodes to."""
    if entry == SEAL:
        return None
    if not 0 < entry < 1 << 32:
        raise ValueError(f"schedule entry {entry} is out of range [0, 2^32)")
    field = (entry >> ROWS_SHIFT) + 1
    if entry & PACKED:
        p = Pass(tokens=entry & MAX_PASS_TOKENS, rows=field * PACKED_UNIT, packed=True)
    else:
        p = Pass(tokens=entry & MAX_PASS_TOKENS, rows=field)
    if p.tokens == 0 or (p.rows > 1 and p.tokens > p.rows):
        raise ValueError(f"schedule entry {entry:#x} encodes no pass ({p.tokens} tokens in {p.rows} rows)")
    return p


def entry_tokens(entry: int) -> int:
    """Tokens fed by one entry (0 for SEAL)."""
    return entry & MAX_PASS_TOKENS


def schedule_tokens(schedule: list[int]) -> int:
    """Tokens fed by every pass of the schedule."""
    return sum(e & MAX_PASS_TOKENS for e in schedule)


def boundaries(schedule: list[int]) -> list[int]:
    """Token counts at every entry boundary: [0, after entry 0, after entry 1, ...]."""
    return [0, *accumulate(e & MAX_PASS_TOKENS for e in schedule)]


def check_schedule(schedule: list[int]) -> None:
    """ValueError naming the first entry that encodes no pass."""
    for i, e in enumerate(schedule):
        try:
            decode_pass(int(e))
        except ValueError as err:
            raise ValueError(f"schedule[{i}]: {err}") from None


def replay_passes(schedule: list[int], pack: bool = True) -> list[Pass | None]:
    """The passes that rebuild `schedule`'s KV, in order (None: SEAL).

    With `pack`, consecutive batched entries of the same row count R are merged into passes of at most R
    of the session's tokens: in an [R, 1] pass each row's bits do not depend on the other rows, and rows of
    one cache attend in row order, so R recorded steps replay as one pass, bit for bit. (Callers whose
    cache acts between whole passes — token eviction — replay unpacked.) Packed prefill segments replay
    one entry per pass: a segment attends as a block, never as rows."""
    out: list[Pass | None] = []
    for entry in schedule:
        p = decode_pass(entry)
        last = out[-1] if out else None
        if (pack and p is not None and p.batched and last is not None and last.batched and last.rows == p.rows
                and last.tokens + p.tokens <= p.rows):
            out[-1] = Pass(last.tokens + p.tokens, p.rows)
        else:
            out.append(p)
    return out


def canonical_tokens(schedule: list[int], chunk: int) -> int:
    """Tokens at the start of a history whose KV is canonical (see the module docstring)."""
    n = 0
    for p in schedule:
        if p != chunk:
            break
        n += chunk
    return n


def passes(start: int, end: int, chunk: int) -> list[int]:
    """Forward-pass lengths covering [start, end), cut at the multiples of `chunk`."""
    out, pos = [], start
    while pos < end:
        stop = min(end, (pos // chunk + 1) * chunk)
        out.append(stop - pos)
        pos = stop
    return out


def adopted_schedule(tokens: int, chunk: int) -> list[int]:
    """The schedule of a session that adopted `tokens` canonical tokens."""
    return [chunk] * (tokens // chunk) + [SEAL]
