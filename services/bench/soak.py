"""`kvstash bench soak`: load with faults for a while, then count lost sessions (there must be none).

    kvstash bench soak [--model M] [--minutes 10] [--concurrency 16] [--fault-every 30] [--json]

Starts its own redis-server (AOF on) and `kvstash up` (two workers), then runs `--concurrency` clients that
open sessions and resume them (evicting some first) over real gRPC. Every `--fault-every` seconds it
injects one fault, in turn: Redis killed and restarted from its AOF, a worker actor SIGKILLed, Redis
FLUSHALL (histories come back from the workers' journals). Calls cut by a fault may fail with a retryable
status; clients go on. At the end every session a client saw complete a call is checked: it must still
exist with at least the tokens that call acknowledged. Reported: calls by status code, faults injected,
sessions checked and sessions lost.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import tempfile
import time
from pathlib import Path


async def _client(target, seed, stop_at, args, seen, codes) -> None:
    import grpc

    from services.client import AsyncKvstashClient

    rng = random.Random(seed)
    c = AsyncKvstashClient(target, timeout=300)
    mine: list[str] = []
    try:
        while time.monotonic() < stop_at:
            try:
                if mine and rng.random() < 0.5:
                    sid = rng.choice(mine)
                    if rng.random() < 0.3:
                        await c.evict_session(sid)
                    out = await c.resume(sid, max_new_tokens=args.new_tokens)
                else:
                    out = await c.generate(token_ids=[rng.randrange(1000, 20000) for _ in range(48)],
                                           max_new_tokens=args.new_tokens)
                    mine.append(out.session_id)
                seen[out.session_id] = max(seen.get(out.session_id, 0), out.usage.session_tokens)
                codes["OK"] = codes.get("OK", 0) + 1
            except grpc.aio.AioRpcError as e:
                codes[e.code().name] = codes.get(e.code().name, 0) + 1
                await asyncio.sleep(0.5)
    finally:
        await c.close()


async def _faults(svc, redis_server, stop_at, every, log) -> None:
    kinds = ["redis-restart", "worker-kill", "flushall"]
    i = 0
    while time.monotonic() + every < stop_at:
        await asyncio.sleep(every)
        kind = kinds[i % len(kinds)]
        i += 1
        if kind == "redis-restart":
            redis_server.kill()
            await asyncio.sleep(2)
            redis_server.restart()
        elif kind == "worker-kill":
            pids = sorted(Path(svc.env["KVSTASH_HOME"], "run").glob("worker-*.pid"))
            try:
                os.kill(int(pids[i % len(pids)].read_text()), signal.SIGKILL)
            except (OSError, ValueError, IndexError):
                continue
        else:
            redis_server.client().flushall()
        log.append(kind)


async def _soak(svc, redis_server, args) -> dict:
    seen: dict[str, int] = {}
    codes: dict[str, int] = {}
    faults: list[str] = []
    stop_at = time.monotonic() + args.minutes * 60
    await asyncio.gather(_faults(svc, redis_server, stop_at, args.fault_every, faults),
                         *(_client(svc.target, i, stop_at, args, seen, codes) for i in range(args.concurrency)))
    await asyncio.sleep(5)  # let housekeeping write histories back after the last fault
    from services.client import AsyncKvstashClient

    lost = []
    c = AsyncKvstashClient(svc.target, timeout=120)
    try:
        for sid, tokens in seen.items():
            for attempt in range(20):
                try:
                    info = await c.get_session(sid)
                    if info.token_count < tokens:
                        lost.append(sid)
                    break
                except Exception as e:  # noqa: BLE001
                    if "NOT_FOUND" in str(e) or attempt == 19:
                        lost.append(sid)
                        break
                    await asyncio.sleep(1)
    finally:
        await c.close()
    return {"minutes": args.minutes, "concurrency": args.concurrency, "calls": sum(codes.values()), "codes": codes,
            "faults": faults, "sessions_checked": len(seen), "sessions_lost": len(lost)}


def run_soak(args) -> int:
    from services.bench.common import models_dir
    from services.runtime.process import ServiceProcess
    from services.runtime.redis_server import RedisServer

    home = tempfile.mkdtemp(prefix="kvstash-soak-")
    redis_server = RedisServer(data_dir=str(Path(home) / "redis"), appendonly=True).start()
    env = {"KVSTASH_MODEL__NAME": args.model, "KVSTASH_MODEL__CACHE_DIR": models_dir(),
           "KVSTASH_RAY__NUM_WORKERS": "2", "KVSTASH_HOME": home,
           "KVSTASH_REDIS__URL": redis_server.url, "KVSTASH_SESSION__IDLE_TIMEOUT_S": "20",
           "KVSTASH_SESSION__IDLE_CHECK_INTERVAL_S": "1", "KVSTASH_REDIS__SOCKET_TIMEOUT_S": "2"}
    if args.kv:
        env["KVSTASH_KV__SPEC"] = args.kv
    svc = ServiceProcess(Path(home) / "service", env).start(timeout=600)
    try:
        res = asyncio.run(_soak(svc, redis_server, args))
    finally:
        svc.stop()
        redis_server.stop()
    print(json.dumps(res, indent=None if args.json else 1))
    return 0 if res["sessions_lost"] == 0 else 1
