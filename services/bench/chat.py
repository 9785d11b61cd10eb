"""`kvstash bench chat`: a multi-turn chat workload whose sessions go idle between rounds, three ways.

    kvstash bench chat [--model M] [--users 8] [--rounds 5] [--system-tokens 256] [--turn-tokens 64]
                       [--new-tokens 32] [--idle 2] [--think 4] [--modes default,no-tier,fp] [--json]

In the style of LMCache's multi-round QA and vLLM's multi-turn benchmark: U users each hold one conversation
of R rounds; every conversation opens with the same system prompt (`--system-tokens`), and each round sends
a new user turn (`--turn-tokens`) and takes `--new-tokens` greedy tokens, so each user's history grows. All
users send their round at once; between rounds they think for `--think` seconds, longer than the worker's
idle timeout (`--idle`), so every session really goes to Redis and the next round resumes it. Modes, each
a kvstash worker (`Engine`, no Ray or gRPC) with a real redis-server, run in the same process:
- `default`: the service as configured (quantized device KV, lossless codec, dedup, host tier);
- `no-tier`: what a plain server does after eviction: no KV tier at all — before every round the sessions'
  stored blocks are deleted from Redis, and the host tier and prefix trie are off, so each resume
  re-prefills the whole history from the tokens (exact, `kvstash_recomputes_total{reason="missing"}`);
- `fp`: a full-precision KV tier: `kv.spec = fp` (no quantization on device or in Redis).
Reported per mode: TTFT by round (mean over users), generated tokens/s over the whole run (think time
excluded), and Redis bytes per session at the end (every key a session references, shared blocks counted
once in total). Ratios: `ttft_vs_no_tier` (no-tier's TTFT over the mode's, rounds >= 2) and
`bytes_vs_fp` (the mode's Redis bytes over fp's).
"""

from __future__ import annotations

import json
import random
import statistics
import tempfile
import threading
import time


def _engine(args, mode: str, redis_url: str, ns: str):
    from services.config import KvstashConfig
    from services.worker.engine import Engine

    d = {"model": {"name": args.model}, "redis": {"url": redis_url, "namespace": ns},
         "kv": {"quality_sample_rate": 0},
         "session": {"idle_timeout_s": args.idle, "idle_check_interval_s": 0.25, "max_requests_per_worker": 4096}}
    if mode == "no-tier":
        d["tiers"] = {"host_bytes": 0}
        d["prefix"] = {"trie_bytes": 0}
    elif mode == "fp":
        d["kv"]["spec"] = "fp"
    return Engine(KvstashConfig.from_dict(d))


def _call(eng, sid: str, ids: list[int], n: int, create: bool) -> tuple[float, int, object]:
    from services.wire import DoneEvent, GenerateCall, TokensEvent, is_terminal

    done, first, count, last = threading.Event(), [None], [0], []
    t0 = time.monotonic()

    def sink(e):
        if isinstance(e, TokensEvent) and e.ids:
            count[0] += len(e.ids)
            if first[0] is None:
                first[0] = time.monotonic() - t0
        elif is_terminal(e):
            last.append(e)
            done.set()

    eng.submit(GenerateCall("chat", sid, create, {"token_ids": ids}, n), sink)
    done.wait()
    if not isinstance(last[0], DoneEvent):
        raise RuntimeError(f"{sid}: {last[0]}")
    return first[0], count[0], last[0].usage


def _run_mode(args, mode: str, redis_url: str) -> dict:
    eng = _engine(args, mode, redis_url, f"chat-{mode}")
    try:
        rng = random.Random(7)
        vocab = min(eng.runner.vocab_size, 20000)
        system = [rng.randrange(1000, vocab) for _ in range(args.system_tokens)]
        ttft = [[] for _ in range(args.rounds)]
        sources = [dict() for _ in range(args.rounds)]
        tokens, busy = 0, 0.0
        for rnd in range(args.rounds):
            if rnd:
                time.sleep(args.think)  # longer than the idle timeout: the sessions go to Redis
                if mode == "no-tier":
                    _drop_blocks(eng, [f"u{u}" for u in range(args.users)])
            results, threads = {}, []
            t0 = time.monotonic()
            for u in range(args.users):
                turn = [rng.randrange(1000, vocab) for _ in range(args.turn_tokens)]
                ids = system + turn if rnd == 0 else turn

                def one(u=u, ids=ids, results=results, create=rnd == 0):
                    results[u] = _call(eng, f"u{u}", ids, args.new_tokens, create=create)

                threads.append(threading.Thread(target=one))
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            busy += time.monotonic() - t0
            for first, n, usage in results.values():
                ttft[rnd].append(first)
                tokens += n
                src = usage.kv_source
                sources[rnd][src] = sources[rnd].get(src, 0) + 1
        time.sleep(args.think)  # the last round's sessions go to Redis too
        stored = 0  # per session: its record and every block it references (shared ones too)
        for u in range(args.users):
            m = eng.tier.get_manifest("chat", f"u{u}")
            stored += eng.tier.session_bytes("chat", f"u{u}", m.blocks if m else [])
        total = eng.tier.stats()["bytes"]  # every block once
        return {"mode": mode, "ttft_by_round_s": [statistics.fmean(x) for x in ttft],
                "sources_by_round": sources, "tokens_per_s": tokens / busy,
                "redis_bytes_per_session": stored / args.users, "redis_bytes_total": total}
    finally:
        eng.close()


def _drop_blocks(eng, sids: list[str]) -> None:
    """No KV tier: delete every stored block the sessions reference (their histories stay)."""
    for sid in sids:
        m = eng.tier.get_manifest("chat", sid)
        if m is not None:
            for ref in m.blocks:
                eng.tier.client.delete(eng.tier.block_key("chat", ref))


def run_chat(args) -> int:
    from services.runtime.redis_server import RedisServer

    if args.think <= args.idle:
        raise SystemExit("--think must be longer than --idle: sessions must go idle between rounds")
    redis = RedisServer(data_dir=tempfile.mkdtemp(prefix="kvstash-bench-chat-")).start()
    try:
        rows = [_run_mode(args, m.strip(), redis.url) for m in args.modes.split(",") if m.strip()]
    finally:
        redis.cleanup()
    by = {r["mode"]: r for r in rows}
    for r in rows:
        late = statistics.fmean(r["ttft_by_round_s"][1:]) if len(r["ttft_by_round_s"]) > 1 else float("nan")
        r["ttft_rounds_2_plus_s"] = late
        if "no-tier" in by:
            r["ttft_vs_no_tier"] = statistics.fmean(by["no-tier"]["ttft_by_round_s"][1:]) / late
        if "fp" in by:
            r["bytes_vs_fp"] = r["redis_bytes_per_session"] / by["fp"]["redis_bytes_per_session"]
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    rounds = len(rows[0]["ttft_by_round_s"])
    print("| mode | " + " | ".join(f"TTFT r{i + 1} s" for i in range(rounds))
          + " | TTFT r2+ vs no-tier | tokens/s | Redis bytes/session | vs fp |")
    print("| --- |" + " ---: |" * (rounds + 4))
    for r in rows:
        print(f"| {r['mode']} | " + " | ".join(f"{t:.3f}" for t in r["ttft_by_round_s"])
              + f" | {r.get('ttft_vs_no_tier', float('nan')):.2f}x | {r['tokens_per_s']:.1f} "
              f"| {r['redis_bytes_per_session']:,.0f} | {r.get('bytes_vs_fp', float('nan')):.2f}x |")
    return 0
