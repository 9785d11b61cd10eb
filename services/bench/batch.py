"""`kvstash bench batch`: decode throughput and latency against concurrent sessions, in one process, side by
side with transformers' own continuous batching.

    kvstash bench batch [--model M] [--kv SPEC] [--dtype D] [--concurrency 1,2,4,8,16,32] [--seconds 20]
                        [--prompt-tokens 64] [--new-tokens 32|LO-HI] [--modes batched,unpacked,interleaved,untuned,
                        plain_linears,hf]
                        [--buckets 1,2,4,8,16,32] [--json]

For each mode and each concurrency N, N client threads run a closed loop for `--seconds`: each call sends a
fresh random prompt of `--prompt-tokens` tokens and takes `--new-tokens` greedy tokens, streamed (`LO-HI`:
a length drawn uniformly per call from the client's seeded generator, the same sequence in every mode; with
one fixed length, clients that start together finish together and send their next prompts as one burst).
Modes:
- `batched`: a kvstash `Engine` (the worker without Ray and gRPC; a real redis-server) with `--buckets`;
- `unpacked`: the batched Engine with `batch.prefill_rows = ""` (each prompt prefills in a pass of its own:
  kvstash before packed prefill);
- `interleaved`: the same Engine with `batch.buckets = "1"` (each session decodes alone: kvstash before
  batching);
- `untuned`: the batched Engine with `batch.tune_gc = false` (Python's garbage collector as CPython sets it:
  kvstash before services/worker/gc_tuning.py);
- `plain_linears`: the batched Engine with `model.prepack_weights = false` (bf16 linear layers through
  torch's `F.linear`: kvstash before services/worker/prepacked_linear.py; with fp32 the same as `batched`);
- `hf`: transformers' `ContinuousBatchingManager` (`model.init_continuous_batching`) on the same model
  weights, dtype and machine, with its own paged fp KV cache and no kvstash in the way. `--dtype` sets every
  mode's model dtype (default: the service default).
Measured from the clients: generated tokens/s, time to first token p50/p99, per-token latency (gaps
between streamed tokens after the first) p50/p99. `vs 1` is tokens/s over the same mode's N=1 row; `vs hf`
over the `hf` row at the same N. Each mode first runs one call alone (warm-up); each level then measures the
`--seconds` after its first `--warmup` seconds (all N clients start at once; the warm-up lets the first
burst of prompts drain): tokens streamed inside that window, and the latencies of the calls started in it.
`gc_pause_s`, `gc_pause_max_s` and `gc_full_collections`: the garbage collector's pauses that end inside the
window (every thread of the process stops for them).
"""

from __future__ import annotations

import json
import random
import tempfile
import threading
import time
import uuid

from services.bench.common import WindowStats


def answer_lengths(spec: str) -> tuple[int, int]:
    """`--new-tokens`: "N" -> (N, N); "LO-HI" -> (LO, HI), 1 <= LO <= HI."""
    lo, _, hi = spec.partition("-")
    try:
        pair = (int(lo), int(hi or lo))
    except ValueError:
        raise SystemExit(f"--new-tokens {spec!r}: want N or LO-HI") from None
    if not 1 <= pair[0] <= pair[1]:
        raise SystemExit(f"--new-tokens {spec!r}: want 1 <= LO <= HI")
    return pair


class _GcWindow:
    """The garbage collector's pauses that end inside [start, stop), fed by `GcPauses` (as a histogram would be)."""

    def __init__(self, start: float, stop: float):
        self.start, self.stop, self._generation = start, stop, ""
        self.total, self.longest, self.full = 0.0, 0.0, 0

    def labels(self, generation: str) -> _GcWindow:
        self._generation = generation
        return self

    def observe(self, seconds: float) -> None:
        if self.start <= time.monotonic() < self.stop:
            self.total += seconds
            self.longest = max(self.longest, seconds)
            self.full += self._generation == "2"


def _closed_loop(n: int, seconds: float, warmup: float, one_call) -> dict:
    from services.worker.gc_tuning import GcPauses

    t0 = time.monotonic()
    stats = WindowStats(t0 + warmup, t0 + warmup + seconds)
    window = _GcWindow(stats.start, stats.stop)
    pauses = GcPauses(window).install()

    def client(i: int) -> None:
        rng = random.Random(1000 * n + i)
        while time.monotonic() < stats.stop:
            started = time.monotonic()
            stamps, ok = one_call(rng)
            stats.call(started, stamps, ok)

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    pauses.remove()
    return {"concurrency": n, **stats.row(), "seconds": seconds, "gc_pause_s": window.total, "gc_pause_max_s": window.longest,
            "gc_full_collections": window.full}


def _kvstash_mode(args, buckets: str, redis_url: str, ns: int, prefill_rows: str | None = None,
                  tune_gc: bool = True, prepack: bool = True):
    from services.config import KvstashConfig
    from services.wire import DoneEvent, GenerateCall, TokensEvent, is_terminal
    from services.worker.engine import Engine

    d = {"model": {"name": args.model, "prepack_weights": prepack}, "redis": {"url": redis_url, "namespace": f"bench{ns}"},
         "kv": {"quality_sample_rate": 0}, "session": {"max_requests_per_worker": 4096}}
    if args.dtype:
        d["model"]["dtype"] = args.dtype
    if args.kv:
        d["kv"]["spec"] = args.kv
    if buckets:
        d["batch"] = {"buckets": buckets}
    if args.prefill_budget:
        d.setdefault("batch", {})["prefill_tokens_per_step"] = args.prefill_budget
    if prefill_rows is not None:
        d.setdefault("batch", {})["prefill_rows"] = prefill_rows
    d.setdefault("batch", {})["tune_gc"] = tune_gc
    eng = Engine(KvstashConfig.from_dict(d))
    vocab, lengths = eng.runner.vocab_size, answer_lengths(args.new_tokens)

    def one_call(rng):
        ids = [rng.randrange(1000, min(vocab, 20000)) for _ in range(args.prompt_tokens)]
        n_new = rng.randint(*lengths)
        done, stamps, ok = threading.Event(), [], [True]

        def sink(e):
            if isinstance(e, TokensEvent) and e.ids:
                stamps.append(time.monotonic())
            elif is_terminal(e):
                ok[0] = isinstance(e, DoneEvent)
                done.set()

        eng.submit(GenerateCall("bench", f"s{uuid.uuid4().hex}", True, {"token_ids": ids}, n_new,
                                fresh=True), sink)
        done.wait()
        return stamps, ok[0]

    return eng, one_call


def _hf_mode(args):
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    from services.config import ModelConfig
    from services.worker.model_runner import pick_dtype
    from services.worker.model_store import store_for

    path = store_for().resolve(args.model)
    dtype = pick_dtype(args.dtype or ModelConfig().dtype, torch.device("cpu"))  # the kvstash modes' dtype
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
    lengths = answer_lengths(args.new_tokens)
    gen = GenerationConfig(max_new_tokens=lengths[1], do_sample=False, eos_token_id=-1)
    manager = model.init_continuous_batching(generation_config=gen)
    manager.start()
    vocab = model.get_output_embeddings().weight.shape[0]

    def one_call(rng):
        ids = [rng.randrange(1000, min(vocab, 20000)) for _ in range(args.prompt_tokens)]
        n_new = rng.randint(*lengths)
        rid = manager.add_request(ids, max_new_tokens=n_new, streaming=True)
        stamps, seen = [], 0
        for out in manager.request_id_iter(rid):
            now = time.monotonic()
            while seen < len(out.generated_tokens):
                stamps.append(now)
                seen += 1
            if out.is_finished():
                return stamps, out.error is None
        return stamps, False

    return manager, one_call


def run_batch(args) -> int:
    from services.runtime.redis_server import RedisServer

    levels = [int(n) for n in args.concurrency.split(",")]
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    redis = RedisServer(data_dir=tempfile.mkdtemp(prefix="kvstash-bench-batch-")).start()
    rows = []
    try:
        for i, mode in enumerate(modes):
            if mode == "hf":
                handle, one_call = _hf_mode(args)
            elif mode in ("batched", "unpacked", "interleaved", "untuned", "plain_linears"):
                handle, one_call = _kvstash_mode(args, "1" if mode == "interleaved" else args.buckets, redis.url, i,
                                                 "" if mode == "unpacked" else None, tune_gc=mode != "untuned",
                                                 prepack=mode != "plain_linears")
            else:
                raise SystemExit(f"unknown mode {mode!r}: batched, unpacked, interleaved, untuned, plain_linears or hf")
            try:
                one_call(random.Random(-1))  # warm-up: first-call costs (JIT, allocations) stay out of the rows
                for n in levels:
                    rows.append({"mode": mode, **_closed_loop(n, args.seconds, args.warmup, one_call)})
            finally:
                handle.stop() if mode == "hf" else handle.close()
    finally:
        redis.cleanup()
    for r in rows:
        base = next(x for x in rows if x["mode"] == r["mode"] and x["concurrency"] == levels[0])
        r["vs_1"] = r["tokens_per_s"] / base["tokens_per_s"] if base["tokens_per_s"] else float("nan")
        hf = next((x for x in rows if x["mode"] == "hf" and x["concurrency"] == r["concurrency"]), None)
        r["vs_hf"] = r["tokens_per_s"] / hf["tokens_per_s"] if hf and hf["tokens_per_s"] else float("nan")
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    print("| mode | sessions | tokens/s | vs 1 | vs hf | TTFT p50 s | TTFT p99 s | per-token p50 s | per-token p99 s | calls |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r['mode']} | {r['concurrency']} | {r['tokens_per_s']:.1f} | {r['vs_1']:.2f}x | {r['vs_hf']:.2f}x "
              f"| {r['ttft_p50_s']:.3f} | {r['ttft_p99_s']:.3f} | {r['tpot_p50_s']:.3f} | {r['tpot_p99_s']:.3f} "
              f"| {r['calls']} |")
    return 0
