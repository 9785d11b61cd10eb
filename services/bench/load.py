"""`kvstash bench load`: tokens per second and time to first token against the number of concurrent sessions.

    kvstash bench load [--target HOST:PORT] [--model M] [--workers 1] [--concurrency 1,2,4,8]
                       [--seconds 20] [--warmup 5] [--new-tokens 32] [--prompt-tokens 64] [--resume-every 4]
                       [--metrics-url URL] [--json]

Without `--target` it starts the service itself (`kvstash up` as a child process: its own redis-server,
local Ray, the model) and stops it afterwards. For each concurrency N, N asyncio clients stream calls over
real gRPC for `--warmup` then `--seconds`: each client opens a session with a prompt of `--prompt-tokens`
tokens, and every `--resume-every`-th call instead evicts one of its sessions and resumes it (restore from
Redis; its time to first token counts from before the evict). Measured from the client side, in the window
after the warm-up as `kvstash bench batch` measures (services/bench/common.py, `WindowStats`): tokens
per second (the tokens that arrived in the window, all clients), p50/p99 time to first token and time per
output token of the calls started in it; also the whole phase's tokens/s (first call to last answer: the
start-up burst and the tail where fewer than N calls still run included, as this bench measured before
it had a window), and calls by status code (only OK and the intended RESOURCE_EXHAUSTED backpressure are
expected). From the service's own counters (its /metrics, or `--metrics-url` with `--target`): the
offloads, restores from Redis and recomputations each phase caused, and the mean sessions a decode pass
carried (`sessions_per_pass`: below N while calls wait for their prompt's prefill, a restore or the
client's next call). And the cores each role used during the phase (`cpu_cores`: worker, gateway,
clients, redis, ray, other; services/bench/cpu.py), since all of them share the machine.
The N=1 row is the baseline the others are compared against (`speedup` = tokens/s over N=1's).
"""

from __future__ import annotations

import asyncio
import json
import random
import tempfile
import time

from services.bench.common import WindowStats


async def _client(target, api_key, seed, stats, args, out) -> None:
    import grpc

    from services.client import AsyncKvstashClient

    rng = random.Random(seed)
    sessions: list[str] = []
    client = AsyncKvstashClient(target, api_key=api_key, timeout=300)
    try:
        calls = 0
        while time.monotonic() < stats.stop:
            calls += 1
            resume = args.resume_every and sessions and calls % args.resume_every == 0
            started, stamps, ok = time.monotonic(), [], False
            try:
                if resume:
                    sid = rng.choice(sessions)
                    await client.evict_session(sid)
                    stream = client.resume_stream(sid, max_new_tokens=args.new_tokens)
                else:
                    ids = [rng.randrange(1000, 20000) for _ in range(args.prompt_tokens)]
                    stream = client.generate_stream(token_ids=ids, max_new_tokens=args.new_tokens)
                async for msg in stream:
                    stamps.extend([time.monotonic()] * len(msg.token_ids))
                    if msg.session_id and not resume and msg.session_id not in sessions:
                        sessions.append(msg.session_id)
                out["codes"]["OK"] = out["codes"].get("OK", 0) + 1
                ok = True
            except grpc.aio.AioRpcError as e:
                out["codes"][e.code().name] = out["codes"].get(e.code().name, 0) + 1
                if e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                    await asyncio.sleep(0.2)
            out["tokens"] += len(stamps)
            stats.call(started, stamps, ok)
    finally:
        await client.close()


async def _phase(target, api_key, n, args) -> dict:
    """One concurrency: n clients for `--warmup` then `--seconds`, measured in that window (`WindowStats`); also
    the whole phase's tokens/s, from its start to its last call's end (the figure before the window existed)."""
    out = {"tokens": 0, "codes": {}}
    t0 = time.monotonic()
    stats = WindowStats(t0 + args.warmup, t0 + args.warmup + args.seconds)
    await asyncio.gather(*(_client(target, api_key, 1000 * n + i, stats, args, out) for i in range(n)))
    wall = time.monotonic() - t0
    return {"concurrency": n, **stats.row(), "tokens_per_s_whole": out["tokens"] / wall, "codes": out["codes"],
            "seconds": args.seconds, "warmup_s": args.warmup, "whole_seconds": wall}


COUNTERS = ("kvstash_offloads_total", "kvstash_restores_total", "kvstash_recomputes_total")
PASS_SESSIONS = ("kvstash_batch_sessions_sum", "kvstash_batch_sessions_count")  # sessions per decode pass


def _counters(url: str) -> dict[str, float]:
    """The service's offload, restore and recompute counters and its decode passes' session count histogram
    (sum and count; summed over labels and workers) from its /metrics."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(url, timeout=30) as r:
        text = r.read().decode()
    out = dict.fromkeys(COUNTERS + PASS_SESSIONS, 0.0)
    for fam in text_string_to_metric_families(text):
        for sample in fam.samples:
            if sample.name in out:
                out[sample.name] += sample.value
    return out


def _counted_phase(target, api_key, n, args, metrics_url: str, settle_s: float) -> dict:
    from services.bench.cpu import CpuShare

    before = _counters(metrics_url) if metrics_url else {}
    cpu = CpuShare()
    row = asyncio.run(_phase(target, api_key, n, args))
    row["cpu_cores"] = cpu.cores()
    if metrics_url:
        time.sleep(settle_s)  # the gateway collects worker metrics periodically
        after = _counters(metrics_url)
        for name in COUNTERS:
            row[name.removeprefix("kvstash_").removesuffix("_total")] = int(after[name] - before[name])
        carried, passes = (after[name] - before[name] for name in PASS_SESSIONS)
        row["decode_passes"] = int(passes)
        row["sessions_per_pass"] = carried / max(passes, 1)  # of N at most
    return row


def run_load(args) -> int:
    from services.bench.cpu import ROLES
    from services.runtime.process import ServiceProcess

    svc = None
    target, metrics_url = args.target, args.metrics_url
    if not target:
        env = {"KVSTASH_MODEL__NAME": args.model, "KVSTASH_RAY__NUM_WORKERS": str(args.workers),
               "KVSTASH_REDIS__DATA_DIR": tempfile.mkdtemp(prefix="kvstash-load-"),
               "KVSTASH_SESSION__MAX_REQUESTS_PER_WORKER": "64"}
        if args.kv:
            env["KVSTASH_KV__SPEC"] = args.kv
        svc = ServiceProcess(tempfile.mkdtemp(prefix="kvstash-load-"), env).start(timeout=600)
        target, metrics_url = svc.target, svc.metrics_url
    try:
        rows = [_counted_phase(target, args.api_key, int(n), args, metrics_url, 3.0)
                for n in args.concurrency.split(",")]
    finally:
        if svc is not None:
            svc.stop()
    base, whole = rows[0]["tokens_per_s"] or float("nan"), rows[0]["tokens_per_s_whole"] or float("nan")
    for r in rows:
        r["speedup"], r["speedup_whole"] = r["tokens_per_s"] / base, r["tokens_per_s_whole"] / whole
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    print("| sessions | tokens/s | vs 1 | TTFT p50 s | TTFT p99 s | TPOT p50 s | TPOT p99 s | whole phase: tokens/s, vs 1 "
          f"| sessions per pass | calls | status codes | offloads | restores | recomputes | cores: {' / '.join(ROLES)} |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: | ---: | ---: | --- |")
    for r in rows:
        cores = " / ".join(f"{r['cpu_cores'][k]:.2f}" for k in ROLES if k in r["cpu_cores"])
        print(f"| {r['concurrency']} | {r['tokens_per_s']:.1f} | {r['speedup']:.2f}x | {r['ttft_p50_s']:.3f} "
              f"| {r['ttft_p99_s']:.3f} | {r['tpot_p50_s']:.3f} | {r['tpot_p99_s']:.3f} "
              f"| {r['tokens_per_s_whole']:.1f}, {r['speedup_whole']:.2f}x | {r.get('sessions_per_pass', float('nan')):.1f} | {r['calls']} | {r['codes']} | {r.get('offloads', '')} "
              f"| {r.get('restores', '')} | {r.get('recomputes', '')} | {cores} |")
    return 0
