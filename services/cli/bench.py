"""`kvstash bench`: speed and memory measurements, each against a baseline run in the same process.

    kvstash bench resume --history 512,2048 --kv fp,int8:r128,int4:r128 [--dtype float32] [--json]
    kvstash bench codec [--tokens 2048] [--kv int4:g32:gv32:r128] [--json]   (services/cli/bench_codec.py)
    kvstash bench dedup [--sessions 100] [--prefix 1024] [--own 128] [--json] (services/cli/bench_dedup.py)
    kvstash bench load [--concurrency 1,2,4,8] [--seconds 20] [--json]        (services/cli/bench_load.py)
    kvstash bench soak [--minutes 10] [--concurrency 16] [--json]             (services/cli/bench_soak.py)
    kvstash bench timing [--prefix 1024] [--trials 12] [--json]               (services/cli/bench_timing.py)

`resume`: for each history length and KV spec, a session's cache is built by the worker's canonical
prefill, offloaded through the worker's own `CacheStore` (services/worker/session_store.py) to a real redis-server (spawned unless --redis-url;
the host tier is off, so every resume reads Redis), and measured:
- device KV bytes per token (from tensor storages) and Redis bytes of the offloaded session;
- restore: read the manifest, fetch the blocks in pipelined round trips (decoding the first while the next
  arrive), check, decode, rebuild the cache — the cache is then bit-identical to the offloaded one
  (asserted) — versus re-prefill: the same history run through the model again, as a server without a KV
  tier would;
- `resume_speedup` = re-prefill / restore; and the time to the next token's logits both ways.
Medians over --reps rounds, each round running every measurement once in turn (after one warm-up), so a
shared machine's slow spells weigh on restore and re-prefill alike.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

from services.cli.eval import DEFAULT_TEXT


def add_bench_parser(sub) -> None:
    bench = sub.add_parser("bench", help="benchmarks (speed, memory) against in-process baselines")
    kinds = bench.add_subparsers(dest="bench_cmd", required=True)
    r = kinds.add_parser("resume", help="device bytes/token, Redis bytes/session, restore vs re-prefill latency")
    r.add_argument("--model", default="smollm2-135m-instruct")
    r.add_argument("--dtype", default="float32")
    r.add_argument("--history", default="512,2048", help="comma-separated history lengths in tokens")
    r.add_argument("--kv", default="fp,int8:r128,int4:r128", help="comma-separated KV specs")
    r.add_argument("--text", default=str(DEFAULT_TEXT), help="text to take the history from")
    r.add_argument("--reps", type=int, default=3)
    r.add_argument("--redis-url", default="")
    r.add_argument("--json", action="store_true")
    r.set_defaults(fn=lambda args: run_bench(args))
    from services.cli.bench_codec import add_codec_parser
    from services.cli.bench_dedup import add_dedup_parser
    from services.cli.bench_load import add_load_parser
    from services.cli.bench_soak import add_soak_parser
    from services.cli.bench_timing import add_timing_parser

    add_codec_parser(kinds, str(DEFAULT_TEXT))
    add_dedup_parser(kinds, str(DEFAULT_TEXT))
    add_load_parser(kinds)
    add_soak_parser(kinds)
    add_timing_parser(kinds, str(DEFAULT_TEXT))


def models_dir() -> str:
    """The model cache this environment uses, for benches that run a service under a home of their own."""
    from services.config import KvstashConfig
    from services.worker.model_store import store_for

    return str(store_for(KvstashConfig.load().model.cache_dir).cache_dir)


def median_times(fns, reps: int) -> list[float]:
    """Median seconds of each of `fns` over `reps` rounds that run them in turn, so that a shared machine's
    slow and fast spells weigh on every one of them alike."""
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(reps):
        for fn, ts in zip(fns, times):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
    return [statistics.median(ts) for ts in times]


def worker_store(runner, redis_url: str, spec: str, namespace: str, **sections):
    """A worker's `CacheStore` (host tier off) on `runner` and a Redis URL, as the service builds it."""
    import redis

    from kvstore.tiers.redis_tier import RedisTier
    from services.config import KvstashConfig
    from services.metrics import WorkerMetrics
    from services.worker.session_store import CacheStore

    cfg = KvstashConfig.from_dict({"kv": {"spec": spec}, "tiers": {"host_bytes": 0}, **sections})
    tier = RedisTier(redis.Redis.from_url(redis_url), namespace=namespace)
    return CacheStore(runner, tier, cfg, WorkerMetrics()), tier


def prefill(runner, store, ids):
    """A fresh cache and schedule after the worker's canonical prefill of `ids`."""
    from kvstore.prefix.canonical import passes

    cache, schedule, pos = runner.new_cache(store.quant), [], 0
    for n in passes(0, len(ids), store.prefill_chunk):
        runner.forward(cache, ids[pos:pos + n])
        schedule.append(n)
        pos += n
    return cache, schedule


def run_bench(args) -> int:
    from services.config import ModelConfig
    from services.runtime.redis_server import RedisServer
    from services.worker.model_runner import ModelRunner
    from services.worker.session import Session

    runner = ModelRunner.from_config(ModelConfig(name=args.model, dtype=args.dtype))
    text = Path(args.text).read_text(encoding="utf-8")
    all_ids = runner.tokenizer(text[:200_000], add_special_tokens=False)["input_ids"]
    server = None if args.redis_url else RedisServer().start()
    rows = []
    try:
        for n in (int(x) for x in args.history.split(",")):
            ids = all_ids[:n]
            for spec in args.kv.split(","):
                store, tier = worker_store(runner, args.redis_url or server.url, spec, "kvstash-bench")
                cache, schedule = prefill(runner, store, ids[:-1])
                s = Session("bench", f"s{n}", tokens=list(ids), schedule=schedule, cache=cache)
                before = cache.export_state()
                redis_bytes = store.save(s)

                def restore():
                    record = tier.get_record("bench", s.session_id)
                    cold = Session.from_manifest(*record)
                    got = store.store.restore(cold.tenant, cold.blocks, cold.stored_kv_tokens)  # no cost model
                    assert got.state is not None, got.reason
                    return runner.restore_cache(got.state)

                assert restore().export_state().equals(before), "restored cache differs from the offloaded one"
                restore(), prefill(runner, store, ids[:-1])  # warm-up
                restore_s, reprefill_s, next_restore, next_prefill = median_times(
                    [restore, lambda: prefill(runner, store, ids[:-1]), lambda: runner.forward(restore(), ids[-1:]),
                     lambda: runner.forward(prefill(runner, store, ids[:-1])[0], ids[-1:])], args.reps)
                rows.append({
                    "history": n, "kv": spec, "dtype": args.dtype, "blocks": len(s.blocks),
                    "device_bytes_per_token": cache.device_bytes() / (n - 1), "raw_state_bytes": before.nbytes,
                    "redis_bytes_per_session": redis_bytes, "restore_s": restore_s, "reprefill_s": reprefill_s,
                    "resume_speedup": reprefill_s / restore_s, "next_token_restore_s": next_restore,
                    "next_token_reprefill_s": next_prefill,
                })
                tier.delete_session("bench", s.session_id)
    finally:
        if server:
            server.stop()
    if args.json:
        print(json.dumps(rows, indent=1))
    else:
        print(f"model {args.model} ({args.dtype}), {runner.device}")
        print("| history | kv | device B/token | Redis B/session | restore s | re-prefill s | speedup | "
              "next token: restore s / re-prefill s |")
        print("| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
        for r in rows:
            print(f"| {r['history']} | `{r['kv']}` | {r['device_bytes_per_token']:.0f} | {r['redis_bytes_per_session']} "
                  f"| {r['restore_s']:.4f} | {r['reprefill_s']:.3f} | {r['resume_speedup']:.1f}x "
                  f"| {r['next_token_restore_s']:.3f} / {r['next_token_reprefill_s']:.3f} |")
    return 0
