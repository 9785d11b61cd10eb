"""`kvstash bench resume`: what offloading a session saves, and what restoring it costs against re-prefill.

    kvstash bench resume --history 512,2048 --kv fp,int8:r128,int4:r128 [--dtype float32] [--cold SPEC] [--cluster] [--reps 3] [--json]

For each history length and KV spec, a session's cache is built by the worker's canonical
prefill, offloaded through the worker's own `CacheStore` (services/worker/session_store.py) to a real redis-server (spawned unless --redis-url;
the host tier is off, so every resume reads Redis), and measured:
- whole-session size (`kvstore.sizes`): device bytes of every tensor of the session's state (sinks, sealed
  region, window) and Redis bytes of the offloaded session (manifest + blocks + tail), each per token and
  as a fraction of 16-bit KV of the same tokens;
- restore: read the manifest, fetch the blocks in pipelined round trips (decoding the first while the next
  arrive), check, decode, rebuild the cache — the cache is then bit-identical to the offloaded one
  (asserted) — versus re-prefill: the same history run through the model again, as a server without a KV
  tier would;
- `resume_speedup` = re-prefill / restore; and the time to the next token's logits both ways;
- with `--cold SPEC`: the same session also offloaded with `tiers.cold_spec` = SPEC (lossy cold blocks,
  lossless tail and manifest): `cold_redis_bytes_per_session` and its fraction of 16-bit KV — the whole
  cold session (its quality: `kvstash eval cold`);
- with `--cluster`: the same session also offloaded to a local Redis Cluster (3 masters + 3 replicas of
  redis-server, started here) and restored from it in the same rounds: `cluster_restore_s`,
  `cluster_resume_speedup` and `cluster_over_single` = cluster restore / single-node restore (issue 17's
  target: within 1.2).
Medians over --reps rounds, each round running every measurement once in turn (after one warm-up), so a
shared machine's slow spells weigh on restore and re-prefill alike. `--reps 0` times nothing: sizes and the
bit-exactness of every restore only (for size figures on a shared machine).
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

from services.bench.common import prefill, restore_stored, worker_store


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


def run_resume(args) -> int:
    from kvstore.sizes import state_size
    from services.config import ModelConfig
    from services.runtime.redis_cluster import LocalRedisCluster
    from services.runtime.redis_server import RedisServer
    from services.worker.model_runner import ModelRunner
    from services.worker.session import Session

    runner = ModelRunner.from_config(ModelConfig(name=args.model, dtype=args.dtype))
    text = Path(args.text).read_text(encoding="utf-8")
    all_ids = runner.tokenizer(text[:200_000], add_special_tokens=False)["input_ids"]
    server = None if args.redis_url else RedisServer().start()
    cluster = LocalRedisCluster().start() if args.cluster else None
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

                def restorer(store, tier):
                    return lambda: restore_stored(runner, store, tier, "bench", s.session_id)

                restores = [restorer(store, tier)]
                if cluster:
                    c_store, c_tier = worker_store(runner, cluster.url, spec, "kvstash-bench")
                    c_store.save(s)
                    restores.append(restorer(c_store, c_tier))
                for fn in restores:
                    assert fn().export_state().equals(before), "restored cache differs from the offloaded one"
                size = state_size(before)
                rows.append({
                    "history": n, "kv": spec, "dtype": args.dtype, "blocks": len(s.blocks),
                    "device_bytes_per_token": size.bytes_per_token, "raw_state_bytes": size.total,
                    "device_fraction_of_16bit": size.fraction_of_16bit(), "device_parts": size.to_json(),
                    "redis_bytes_per_session": redis_bytes, "redis_bytes_per_token": redis_bytes / size.tokens,
                    "redis_fraction_of_16bit": size.fraction_of_16bit(redis_bytes),
                })
                if args.cold:  # the same session offloaded with `tiers.cold_spec` (lossy: no exactness check)
                    k_store, k_tier = worker_store(runner, args.redis_url or server.url, spec, "kvstash-bench-cold",
                                                   tiers={"host_bytes": 0, "cold_spec": args.cold})
                    cold_bytes = k_store.save(Session("bench", f"c{n}", tokens=list(ids), schedule=schedule,
                                                      cache=runner.restore_cache(before)))
                    rows[-1].update(cold_redis_bytes_per_session=cold_bytes,
                                    cold_redis_fraction_of_16bit=size.fraction_of_16bit(cold_bytes))
                    k_tier.delete_session("bench", f"c{n}")
                if args.reps > 0:  # --reps 0: sizes and the exactness check only, nothing timed
                    restore = restores[0]
                    fns = [restore, lambda: prefill(runner, store, ids[:-1]),
                           lambda: runner.forward(restore(), ids[-1:]),
                           lambda: runner.forward(prefill(runner, store, ids[:-1])[0], ids[-1:]), *restores[1:]]
                    restore(), prefill(runner, store, ids[:-1])  # warm-up
                    restore_s, reprefill_s, next_restore, next_prefill, *on_cluster = median_times(fns, args.reps)
                    rows[-1].update(restore_s=restore_s, reprefill_s=reprefill_s, resume_speedup=reprefill_s / restore_s,
                                    next_token_restore_s=next_restore, next_token_reprefill_s=next_prefill)
                    if cluster:
                        rows[-1].update(cluster_restore_s=on_cluster[0],
                                        cluster_resume_speedup=reprefill_s / on_cluster[0],
                                        cluster_over_single=on_cluster[0] / restore_s)
                if cluster:
                    c_tier.delete_session("bench", s.session_id)
                tier.delete_session("bench", s.session_id)
    finally:
        if server:
            server.stop()
        if cluster:
            cluster.stop()
    if args.json:
        print(json.dumps(rows, indent=1))
    else:
        print(f"model {args.model} ({args.dtype}), {runner.device}")
        print("| history | kv | device B/token | × 16-bit | Redis B/session | × 16-bit | restore s | re-prefill s "
              "| speedup | next token: restore s / re-prefill s |")
        print("| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
        for r in rows:
            timed = (f"| {r['restore_s']:.4f} | {r['reprefill_s']:.3f} | {r['resume_speedup']:.1f}x "
                     f"| {r['next_token_restore_s']:.3f} / {r['next_token_reprefill_s']:.3f} |"
                     if "restore_s" in r else "| – | – | – | – |")
            print(f"| {r['history']} | `{r['kv']}` | {r['device_bytes_per_token']:.0f} "
                  f"| {r['device_fraction_of_16bit']:.3f} | {r['redis_bytes_per_session']} "
                  f"| {r['redis_fraction_of_16bit']:.3f} {timed}")
        for r in rows:
            if "cold_redis_bytes_per_session" in r:
                print(f"cold `{args.cold}`, {r['history']} `{r['kv']}`: {r['cold_redis_bytes_per_session']} B per "
                      f"session, {r['cold_redis_fraction_of_16bit']:.3f} of 16-bit KV")
        for r in rows:
            if "cluster_restore_s" in r:
                print(f"cluster, {r['history']} `{r['kv']}`: restore {r['cluster_restore_s']:.4f} s, speedup "
                      f"{r['cluster_resume_speedup']:.1f}x, {r['cluster_over_single']:.2f}x the single node's restore")
    return 0
