"""Batched decode keeps exact resume (services/worker/batching.py, kvstore/quant/rows.py), on the real SmolLM2.

- The bucket shapes are batch-invariant on this build: random batch-mates and slots never change a
  session's logits or KV bits; a build where they would is refused bucket by bucket.
- Sessions decoded concurrently in batches leave KV that replaying their recorded schedule rebuilds bit for
  bit, and whose greedy continuation after a restore from Redis, and after a recomputation, is token for
  token the continuation of the device copy that never left.
- With one fixed bucket a prompt's greedy output does not depend on other traffic.
- Packed prefill: the packed sizes are batch-invariant on this build (a build where they are not is
  refused size by size); a lone chunk runs the session's own pass; sessions whose prompts were packed
  resume and recompute exactly (the concurrent test above packs its prompts).
"""

import random
import threading
import time

import pytest
import torch

from kvstore.config import QuantConfig
from kvstore.schedule import Pass, decode_pass, replay_passes
from services.config import DEFAULT_KV_SPEC, ModelConfig
from services.wire import DoneEvent, GenerateCall, TokensEvent, is_terminal
from services.worker.batching import (
    Batcher,
    DecodeStep,
    PrefillStep,
    check_invariance,
    check_packed_invariance,
    verified_prefill_sizes,
    verified_sizes,
)
from services.worker.model_runner import ModelRunner
from tests.services.stack import smollm2_path
from tests.services.worker.test_session_store import block_keys, make_engine, run

pytestmark = pytest.mark.model
SPEC = DEFAULT_KV_SPEC
SIZES = (2, 4, 8, 16, 32)


@pytest.fixture(scope="module")
def runner():
    return ModelRunner(ModelConfig(), str(smollm2_path()))


def bits(cache) -> list[tuple[str, bytes]]:
    return [(name, a.tobytes()) for name, a in cache.export_state().tensors]


@pytest.mark.parametrize("spec", [SPEC, "int4:g32:gv32:r128", "int2:k4v2:g32:gv32:r64:s4:hadv"])
@pytest.mark.parametrize("seed", [1, 2])
def test_every_bucket_is_batch_invariant_on_this_build(runner, spec, seed):
    """Random batch-mates (real sessions and padding, random tokens) at random slots: each size must keep the
    subject's logits and cache bits identical. If this fails, this torch build cannot batch exactly."""
    assert check_invariance(runner, QuantConfig.parse(spec), SIZES, trials=4, seed=seed) == []


class SlotDependentRunner:
    """A model runner whose batched pass is NOT batch-invariant: what a build with slot-dependent kernels does."""

    def __init__(self, runner):
        self.inner = runner

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def forward_rows(self, rows, size):
        logits = self.inner.forward_rows(rows, size)
        return logits + torch.arange(len(rows), dtype=logits.dtype)[:, None] * 1e-6

    def forward_segments(self, segments, size):
        logits = self.inner.forward_segments(segments, size)
        return logits + torch.arange(len(segments), dtype=logits.dtype)[:, None] * 1e-6


PACKED_SIZES = (128, 256, 512)


@pytest.mark.parametrize("spec", [SPEC, "int2:k4v2:g32:gv32:r64:s4:hadv"])
def test_every_packed_prefill_size_is_batch_invariant_on_this_build(runner, spec):
    """Random other prompts' chunks at random rows: each packed size keeps the subject chunk's logits and
    cache bits identical. If this fails, this torch build cannot pack prefills exactly."""
    assert check_packed_invariance(runner, QuantConfig.parse(spec), PACKED_SIZES, trials=4, seed=3) == []


def test_a_build_whose_packed_prefill_is_not_batch_invariant_is_refused(runner, caplog):
    refused = []
    sizes = verified_prefill_sizes(SlotDependentRunner(runner), QuantConfig.parse(SPEC), (128, 256), refused.append)
    assert sizes == () and refused == [128, 256] and "NOT batch-invariant" in caplog.text
    assert verified_prefill_sizes(runner, QuantConfig.parse(SPEC), (128,)) == (128,)


def test_packed_prefill_feeds_each_chunk_as_its_replay_does(runner):
    q = QuantConfig.parse(SPEC)
    b = Batcher(runner, (1, 4), prefill_sizes=(64, 128))
    assert b.prefill_take([60, 60, 20]) == 2 and b.prefill_take([200, 5]) == 1 and b.prefill_take([5] * 20) == 16
    a, c, d, a2, c2 = (runner.new_cache(q) for _ in range(5))
    for x in (a, c, d, a2, c2):
        runner.forward(x, [5, 6, 7])
    (alone,) = b.prefill([PrefillStep(a, [9, 10, 11])])
    assert alone.fed == Pass(3) and torch.equal(alone.logits, runner.forward(a2, [9, 10, 11])) and bits(a) == bits(a2)
    res = b.prefill([PrefillStep(c, list(range(100, 140))), PrefillStep(d, list(range(200, 230)))])
    assert [r.fed for r in res] == [Pass(40, 128, packed=True), Pass(30, 128, packed=True)]
    runner.run_pass(c2, list(range(100, 140)), res[0].fed)  # replay: the chunk alone in a pass of the same rows
    assert bits(c) == bits(c2)
    c3 = runner.new_cache(q)
    runner.forward(c3, [5, 6, 7])
    assert torch.equal(res[0].logits, runner.forward_segments([(c3, list(range(100, 140)))], 128)[0])
    with pytest.raises(ValueError, match="no packed prefill size"):
        b.prefill([PrefillStep(a, [1] * 100), PrefillStep(c, [1] * 100)])


def test_a_build_that_is_not_batch_invariant_is_refused_and_decodes_alone(runner, caplog):
    refused = []
    sizes = verified_sizes(SlotDependentRunner(runner), QuantConfig.parse(SPEC), (1, 4, 16), on_failure=refused.append)
    assert sizes == (1,) and refused == [4, 16]
    assert "NOT batch-invariant" in caplog.text
    assert verified_sizes(SlotDependentRunner(runner), QuantConfig.parse(SPEC), (16,)) == (1,)
    assert verified_sizes(runner, QuantConfig.parse(SPEC), (1, 4, 16)) == (1, 4, 16)


def test_the_batcher_pads_to_the_smallest_bucket_and_a_bucket_of_one_is_the_sessions_own_pass(runner):
    q = QuantConfig.parse(SPEC)
    b = Batcher(runner, (1, 4, 16))
    assert [b.bucket(n) for n in (1, 2, 4, 5, 16, 40)] == [1, 4, 4, 16, 16, 16]
    a, c = runner.new_cache(q), runner.new_cache(q)
    runner.forward(a, [5, 6, 7])
    runner.forward(c, [5, 6, 7])
    (alone,) = b.run([DecodeStep(a, 9)])
    assert alone.rows == 1 and torch.equal(alone.logits, runner.forward(c, [9]))
    assert bits(a) == bits(c)
    res = b.run([DecodeStep(a, 10), DecodeStep(c, 10)])
    assert [r.rows for r in res] == [4, 4] and torch.equal(res[0].logits, res[1].logits) and bits(a) == bits(c)


def _concurrent(eng, calls: dict[str, tuple[list[int] | None, int]]) -> dict[str, tuple[list[int], object]]:
    """Submit every call at once; wait for all; {sid: (tokens, usage)}."""
    out, events = {}, {sid: [] for sid in calls}
    for sid, (ids, n) in calls.items():
        eng.submit(GenerateCall("acme", sid, ids is not None, {"token_ids": ids} if ids else None, n),
                   events[sid].append)
    deadline = time.monotonic() + 600
    for sid, ev in events.items():
        while not ev or not is_terminal(ev[-1]):
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert isinstance(ev[-1], DoneEvent), ev[-1]
        out[sid] = ([t for e in ev if isinstance(e, TokensEvent) for t in e.ids], ev[-1].usage)
    return out


def _greedy_alone(runner, cache, token: int, n: int) -> list[int]:
    out = []
    for _ in range(n):
        token = int(torch.argmax(runner.forward(cache, [token])))
        out.append(token)
    return out


@pytest.fixture(scope="module")
def batched_engine(redis_server):
    eng = make_engine(smollm2_path(), redis_server.url, kv={"spec": SPEC}, batch={"buckets": "1,2,4,8"},
                      prefix={"prefill_chunk": 512})
    yield eng
    eng.close()


def test_sessions_decoded_in_batches_resume_and_recompute_exactly(batched_engine):
    eng, runner = batched_engine, batched_engine.runner
    rng = random.Random(5)
    prompts = {f"b{i}": [rng.randrange(1000, 20000) for _ in range(rng.randrange(20, 60))] for i in range(6)}
    before, packed_before, packed = eng.metrics.batch_sessions._sum.get(), eng.metrics.prefill_packed._sum.get(), False
    _concurrent(eng, {sid: (ids, 40) for sid, ids in prompts.items()})
    for sid in prompts:
        # on the engine thread: the DoneEvent is sent before the engine releases the session
        s = eng.scheduler.call(lambda sid=sid: eng.sessions.find("acme", sid)).result(timeout=60)
        rows = {decode_pass(e).rows for e in s.schedule if not decode_pass(e).packed}
        assert max(rows) > 1, f"{sid} was never decoded in a batch: {rows}"
        packed |= any(decode_pass(e).packed for e in s.schedule)
    assert eng.metrics.batch_sessions._sum.get() - before > 40  # passes carried several sessions
    assert packed and eng.metrics.prefill_packed._sum.get() - packed_before >= 2  # prompts were packed

    for i, sid in enumerate(prompts):
        s = eng.scheduler.call(lambda sid=sid: eng.sessions.find("acme", sid)).result(timeout=60)
        state, last = eng.scheduler.call(lambda s=s: (s.cache.export_state(), s.tokens[-1])).result(timeout=60)
        # 1. replaying the recorded schedule (packed) rebuilds the device KV bit for bit
        replayed = runner.new_cache(QuantConfig.parse(SPEC))
        done = 0
        for p in replay_passes(s.schedule):
            runner.run_pass(replayed, s.tokens[done:done + p.tokens], p)
            done += p.tokens
        assert bits(replayed) == [(n, a.tobytes()) for n, a in state.tensors]
        # 2. the continuation of the copy that never left the device, decoded alone
        control = _greedy_alone(runner, runner.restore_cache(state), last, 12)
        # 3. offload, then resume from Redis (restore) or with its blocks gone (recompute from the schedule)
        eng.evict("acme", sid).result(timeout=120)
        if i % 2:
            for key in block_keys(eng, "acme", sid):
                eng.tier.client.delete(key)
        tokens, usage = run(eng, "acme", sid, n=12, create=False)
        assert usage.kv_source == ("recomputed" if i % 2 else "restored"), usage
        assert tokens == control, f"{sid}: continuation after {usage.kv_source} differs"


def test_with_one_fixed_bucket_a_prompt_gives_the_same_tokens_alone_and_among_busy_sessions(redis_server):
    eng = make_engine(smollm2_path(), redis_server.url, kv={"spec": SPEC}, batch={"buckets": "16"},
                      prefix={"prefill_chunk": 512})
    try:
        rng = random.Random(9)
        prompt = [rng.randrange(1000, 20000) for _ in range(40)]
        alone, _ = run(eng, "acme", "alone", prompt, n=24)
        busy = {f"busy{i}": ([rng.randrange(1000, 20000) for _ in range(rng.randrange(8, 70))], 30) for i in range(15)}
        got = _concurrent(eng, {**busy, "among": (prompt, 24)})
        assert got["among"][0] == alone
        s = eng.sessions.find("acme", "among")
        assert {decode_pass(e).rows for e in s.schedule[1:]} == {16}
    finally:
        eng.close()


def test_a_long_prefill_does_not_stall_the_running_batch(redis_server, tiny_model_dir):
    """While a 2,048-token prompt is prefilled chunk by chunk, a running session keeps decoding between chunks."""
    eng = make_engine(tiny_model_dir, redis_server.url, batch={"buckets": "1,4", "prefill_tokens_per_step": 64},
                      prefix={"prefill_chunk": 64})
    try:
        order: list[str] = []
        lock = threading.Lock()

        def sink(name):
            def put(e):
                if isinstance(e, TokensEvent):
                    with lock:
                        order.append(name)
            return put

        eng.scheduler.call(lambda: None).result(timeout=30)
        eng.submit(GenerateCall("acme", "runner", True, {"token_ids": list(range(1000, 1010))}, 60), sink("decode"))
        eng.submit(GenerateCall("acme", "long", True, {"token_ids": [1000 + i % 5000 for i in range(2048)]}, 1),
                   sink("long"))
        deadline = time.monotonic() + 300
        while order.count("long") < 1 or order.count("decode") < 60:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        first = order.index("long")
        # 2048 tokens are 32 chunks of 64: one chunk per turn, so the running session decoded meanwhile
        assert order[:first].count("decode") >= 20, order[:first + 1]
    finally:
        eng.close()
