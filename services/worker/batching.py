"""Batched decode: the sessions ready for a decode step share one forward pass of a fixed row count.

A running call's generator asks for a decode step by yielding a `DecodeStep` (its cache, the token to
feed) and receives a `DecodeResult` (the logits, and the row count of the pass it ran in, which the
session records in its schedule as `Pass(1, rows)`). The scheduler gathers the waiting steps and hands
them to `Batcher.run`, which pads them to the smallest bucket (`batch.buckets`) that holds them:

- a bucket of 1 runs the session's own pass (`ModelRunner.forward`, shape [1, 1]), exactly the decode
  step kvstash ran before batching existed;
- a bucket of R >= 2 runs one [R, 1] pass (`ModelRunner.forward_rows`, kvstore/quant/rows.py): row-wise
  ops on all rows at once, attention per session over its own quantized cache.

Why this keeps exact resume: with a fixed row count, each row's bits do not depend on what the other rows
hold or which slot it sits in (batch invariance of this build's kernels at that shape). So a session's KV
is a function of its tokens and of the recorded row count of every pass, and replay (which packs up to R
recorded steps of a session into one [R, 1] pass) rebuilds it bit for bit. `check_invariance` verifies
the property for every bucket when a worker starts, on the real model; a bucket that fails is refused
(logged as an error, counted in `kvstash_batch_invariance_failures_total`) and the worker decodes without it —
with no bucket left above 1 it decodes each session alone, exact as before.

Invariants:
- `Batcher.sizes` always contains 1 unless the configured buckets exclude it; every size in it passed
  `check_invariance` (or is 1).
- `run(steps)` returns one result per step, in order; each step's pass has `rows` rows with
  `rows >= len(steps in that pass)`, the smallest configured bucket that holds them (the largest bucket
  when more steps wait than it holds: the rest wait for the next pass).

Packed prefill. A call whose prompt's last chunk is ready yields a `PrefillStep` instead of running it;
the scheduler hands the waiting chunks to `Batcher.prefill`, which runs them as segments of one packed pass
of [1, R] rows (kvstore/quant/segments.py), R the smallest of `prefill_sizes` that holds their tokens, and
answers each with the logits of its last position and the `Pass(n, R, packed=True)` its schedule records.
A chunk that waits alone (or no packed size) runs the session's own pass, `Pass(n)`, as before. Packed
sizes pass the same `check_invariance` (segments of random batch-mates at random rows) or are refused.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable
from dataclasses import dataclass

import torch

from kvstore.device import LOGIT_ROWS, QuantizedKVCache
from kvstore.schedule import Pass

log = logging.getLogger(__name__)


@dataclass
class DecodeStep:
    """A running call's request for one decode step: feed `token` on top of `cache`. `fed` counts the tokens
    the call's own pass fed just before asking (a prompt's last chunk), for the scheduler's prefill budget."""

    cache: QuantizedKVCache
    token: int
    fed: int = 0


@dataclass
class DecodeResult:
    """The step's float32 logits [vocab], and the row count of the pass that ran it."""

    logits: torch.Tensor
    rows: int


@dataclass
class PrefillStep:
    """A running call's request to feed its prompt's last chunk `ids` on top of `cache`."""

    cache: QuantizedKVCache
    ids: list[int]


@dataclass
class PrefillResult:
    """The chunk's last-position float32 logits [vocab], and the pass that fed it (for the schedule)."""

    logits: torch.Tensor
    fed: Pass


def smallest_fitting(sizes: tuple[int, ...], n: int) -> int | None:
    """The smallest of the ascending `sizes` that holds `n` rows or tokens; None when none does."""
    return next((size for size in sizes if size >= n), None)


class Batcher:
    """Runs the scheduler's decode and packed prefill passes; `on_pass(rows, sessions)` is told the shape of
    each decode pass, `on_packed(chunks)` the chunk count of each packed one."""

    def __init__(self, runner, sizes: tuple[int, ...], on_pass: Callable[[int, int], None] | None = None,
                 prefill_sizes: tuple[int, ...] = (), on_packed: Callable[[int], None] | None = None):
        self.runner = runner
        self.sizes = tuple(sorted(sizes))
        self.prefill_sizes = tuple(sorted(prefill_sizes))
        self.on_pass, self.on_packed = on_pass, on_packed

    def prefill_take(self, lengths: list[int]) -> int:
        """How many of the oldest waiting chunks (their token counts, oldest first) the next prefill pass
        takes: as many as fit the largest packed size (at most LOGIT_ROWS), at least one."""
        room, n = (self.prefill_sizes[-1] if self.prefill_sizes else 0), 0
        while n < min(len(lengths), LOGIT_ROWS) and lengths[n] <= room:
            room -= lengths[n]
            n += 1
        return max(1, n)

    def prefill(self, steps: list[PrefillStep]) -> list[PrefillResult]:
        """Feed the chunks, one result per step in order: a lone chunk in a pass of its own, several (at most
        what `prefill_take` takes) as segments of one packed pass."""
        if len(steps) == 1:
            s = steps[0]
            return [PrefillResult(self.runner.forward(s.cache, s.ids), Pass(len(s.ids)))]
        total = sum(len(s.ids) for s in steps)
        rows = smallest_fitting(self.prefill_sizes, total)
        if rows is None or len(steps) > LOGIT_ROWS:
            raise ValueError(f"{len(steps)} chunks of {total} tokens fit no packed prefill size {self.prefill_sizes}")
        logits = self.runner.forward_segments([(s.cache, s.ids) for s in steps], rows)
        if self.on_packed is not None:
            self.on_packed(len(steps))
        return [PrefillResult(logits[i], Pass(len(s.ids), rows, packed=True)) for i, s in enumerate(steps)]

    @property
    def max_rows(self) -> int:
        return self.sizes[-1]

    def bucket(self, n: int) -> int:
        """The smallest bucket holding `n` rows (the largest bucket when none does)."""
        fit = smallest_fitting(self.sizes, n)
        return self.sizes[-1] if fit is None else fit

    def run(self, steps: list[DecodeStep]) -> list[DecodeResult]:
        """Decode up to `max_rows` steps in one pass (callers pass at most that many)."""
        if not 0 < len(steps) <= self.max_rows:
            raise ValueError(f"{len(steps)} steps for a batcher of at most {self.max_rows} rows")
        rows = self.bucket(len(steps))
        if rows == 1:
            results = [DecodeResult(self.runner.forward(steps[0].cache, [steps[0].token]), 1)]
        else:
            logits = self.runner.forward_rows([(s.cache, s.token) for s in steps], rows)
            results = [DecodeResult(logits[i], rows) for i in range(len(steps))]
        if self.on_pass is not None:
            self.on_pass(rows, len(steps))
        return results


def check_invariance(runner, quant, sizes: tuple[int, ...], trials: int = 3, seed: int = 0) -> list[int]:
    """The row counts in `sizes` (>= 2) at which a pass is NOT batch-invariant on this build and model.

    For each size, a subject session (a cache of 40 tokens, the same each trial) takes one decode step in
    `trials` passes with different batch-mates — real sessions (which grow as they take steps) and padding
    rows, all with random tokens — at different slots; its logits and every tensor of its cache afterwards
    must be bit-identical across the trials. Deterministic for a given `seed`."""
    rng = random.Random(seed)
    vocab = runner.vocab_size
    state = _subject(runner, quant, rng)
    mates = []
    for n in (3, 17, 29):
        mates.append(runner.new_cache(quant))
        runner.forward(mates[-1], [rng.randrange(vocab) for _ in range(n)])

    def trial(size: int, _: int) -> tuple:
        subject = runner.restore_cache(state)
        rows = [(m, rng.randrange(vocab)) for m in rng.sample(mates, rng.randrange(min(size, len(mates) + 1)))]
        rows.insert(rng.randrange(len(rows) + 1), (subject, 7))
        rows += [(None, rng.randrange(vocab)) for _ in range(rng.randrange(size - len(rows) + 1))]
        slot = next(i for i, r in enumerate(rows) if r[0] is subject)
        return _outcome(runner.forward_rows(rows, size)[slot], subject)

    return _unstable([s for s in sizes if s >= 2], trials, trial)


def check_packed_invariance(runner, quant, sizes: tuple[int, ...], trials: int = 2, seed: int = 0) -> list[int]:
    """The packed prefill sizes in `sizes` at which a segment is NOT batch-invariant on this build and model.

    For each size, a subject session (a cache of 40 tokens, the same each trial) feeds a chunk of 25 tokens
    first alone in a pass of that size (what replay runs), then in `trials` packed passes after 1-3 other
    sessions' chunks of random lengths (random tokens), padding after them; its logits and every tensor of
    its cache afterwards must be bit-identical."""
    rng = random.Random(seed)
    vocab = runner.vocab_size
    state = _subject(runner, quant, rng)
    chunk = [rng.randrange(vocab) for _ in range(25)]

    def trial(size: int, t: int) -> tuple:
        subject, segments, room = runner.restore_cache(state), [], size - len(chunk)
        for _ in range(0 if t == 0 else rng.randrange(1, 4)):
            n = rng.randrange(1, max(2, min(room, 3 * size // 8)))
            mate = runner.new_cache(quant)
            runner.forward(mate, [rng.randrange(vocab) for _ in range(rng.randrange(1, 30))])
            segments.append((mate, [rng.randrange(vocab) for _ in range(n)]))
            room -= n
        slot = rng.randrange(1, len(segments) + 1) if segments else 0
        segments.insert(slot, (subject, chunk))
        return _outcome(runner.forward_segments(segments, size)[slot], subject)

    return _unstable(list(sizes), trials + 1, trial)


def _subject(runner, quant, rng: random.Random):
    """The exported state of a 40-token session of random tokens: every trial's subject starts from it."""
    cache = runner.new_cache(quant)
    runner.forward(cache, [rng.randrange(runner.vocab_size) for _ in range(40)])
    return cache.export_state()


def _outcome(logits: torch.Tensor, cache) -> tuple:
    return logits.numpy().tobytes(), [(n, a.tobytes()) for n, a in cache.export_state().tensors]


def _unstable(sizes: list[int], trials: int, trial: Callable[[int, int], tuple]) -> list[int]:
    """The sizes whose `trial(size, t)` outcomes are not all the same over t < trials."""
    failed = []
    for size in sizes:
        first = trial(size, 0)
        if any(trial(size, t) != first for t in range(1, trials)):
            failed.append(size)
    return failed


def verified_sizes(runner, quant, sizes: tuple[int, ...], on_failure=None) -> tuple[int, ...]:
    """`sizes` without those `check_invariance` refuses (logged loudly; `on_failure(size)` per refused size)."""
    ok = _refuse(check_invariance(runner, quant, sizes), sizes, "batched decode", "its batch-mates", on_failure)
    return ok if ok else (1,)


def verified_prefill_sizes(runner, quant, sizes: tuple[int, ...], on_failure=None) -> tuple[int, ...]:
    """Packed prefill `sizes` without those `check_packed_invariance` refuses (logged loudly; `on_failure(size)`
    per refused size). Empty when none passes: every prompt then prefills in a pass of its own."""
    return _refuse(check_packed_invariance(runner, quant, sizes), sizes, "packed prefill",
                   "the prompts packed with it", on_failure)


def _refuse(bad: list[int], sizes: tuple[int, ...], what: str, mates: str, on_failure) -> tuple[int, ...]:
    for size in bad:
        log.error("%s at %d rows is NOT batch-invariant on this torch build and model: a session's KV would depend "
                  "on %s, so that size is refused (exact resume is kept)", what, size, mates)
        if on_failure is not None:
            on_failure(size)
    return tuple(s for s in sizes if s not in bad)
