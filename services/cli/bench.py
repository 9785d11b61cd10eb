"""`kvstash bench`: speed and memory measurements, each against a baseline run in the same process.

    kvstash bench resume --history 512,2048 --kv fp,int8:r128,int4:r128 [--dtype float32] [--json]
    kvstash bench codec [--tokens 2048] [--kv int4:g32:gv32:r128] [--json]   (see services/cli/bench_codec.py)

For each history length and KV spec: the device KV bytes per token (measured from tensor storages),
the Redis bytes of the offloaded session (written to a real redis-server, spawned unless --redis-url),
and the latency to the next token's logits by restoring from Redis versus re-prefilling the history.
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
    r = kinds.add_parser("resume", help="device bytes/token, Redis bytes/session, resume vs re-prefill latency")
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

    add_codec_parser(kinds, str(DEFAULT_TEXT))


def _median_time(fn, reps: int) -> float:
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def run_bench(args) -> int:
    import redis

    from kvstore.codec.kv import decode_kv, encode_kv
    from kvstore.config import QuantConfig
    from kvstore.quant.cache import QuantizedKVCache
    from kvstore.tiers.redis_tier import RedisTier
    from kvstore.tiers.manifest import SessionManifest
    from services.config import ModelConfig
    from services.runtime.redis_server import RedisServer
    from services.worker.model_runner import ModelRunner

    runner = ModelRunner.load(ModelConfig(name=args.model, dtype=args.dtype))
    text = Path(args.text).read_text(encoding="utf-8")
    all_ids = runner.tokenizer(text[:200_000], add_special_tokens=False)["input_ids"]
    server = None if args.redis_url else RedisServer().start()
    tier = RedisTier(redis.Redis.from_url(args.redis_url or server.url), namespace="kvstash-bench")
    rows = []
    try:
        for n in (int(x) for x in args.history.split(",")):
            ids = all_ids[:n]
            prefill_s = _median_time(lambda: runner.forward(runner.new_cache(QuantConfig.parse("fp")), ids), args.reps)
            for spec in args.kv.split(","):
                q = QuantConfig.parse(spec)
                cache = runner.new_cache(q)
                runner.forward(cache, ids[:-1])
                state = cache.export_state()
                blob = encode_kv(state, model_fingerprint=runner.fingerprint)
                m = SessionManifest(tenant="bench", session_id=f"s{n}", tokens=ids, schedule=[n - 1], kv_tokens=n - 1,
                                    model_fingerprint=runner.fingerprint, quant_spec=q.spec(), created_at=0, updated_at=0)
                redis_bytes = tier.put_session(m, blob)

                def restore():
                    st = decode_kv(tier.get_kv("bench", f"s{n}"), model_fingerprint=runner.fingerprint)
                    runner.forward(runner.restore_cache(st), ids[-1:])

                def reprefill():
                    runner.forward(runner.new_cache(q), ids)

                rows.append({
                    "history": n, "kv": spec, "dtype": args.dtype,
                    "device_bytes_per_token": cache.device_bytes() / (n - 1),
                    "raw_state_bytes": state.nbytes, "redis_bytes_per_session": redis_bytes,
                    "resume_s": _median_time(restore, args.reps), "reprefill_s": _median_time(reprefill, args.reps),
                    "fp_prefill_s": prefill_s,
                })
                tier.delete_session("bench", f"s{n}")
    finally:
        if server:
            server.stop()
    if args.json:
        print(json.dumps(rows, indent=1))
    else:
        print(f"model {args.model} ({args.dtype}), {runner.device}")
        print("| history | kv | device B/token | Redis B/session | resume s | re-prefill s | speedup |")
        print("| ---: | --- | ---: | ---: | ---: | ---: | ---: |")
        for r in rows:
            print(f"| {r['history']} | `{r['kv']}` | {r['device_bytes_per_token']:.0f} | {r['redis_bytes_per_session']} "
                  f"| {r['resume_s']:.4f} | {r['reprefill_s']:.4f} | {r['reprefill_s'] / r['resume_s']:.1f}x |")
    return 0
