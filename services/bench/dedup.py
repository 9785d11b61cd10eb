"""`kvstash bench dedup`: Redis bytes of many sessions sharing a system prompt, against storing each alone.

    kvstash bench dedup [--sessions 100] [--prefix 1024] [--own 128] [--kv SPEC] [--block-tokens B]
                        [--redis-url URL] [--cluster] [--json]

Each session's prompt is the same `--prefix` tokens of text followed by `--own` tokens of its own (from
another part of the text). Each runs through a real worker `Engine` (real model, real redis-server, the
service's own prefill, prefix adoption and offload paths: one generated token, then EvictSession), in
three scenarios, each in its own Redis namespace:
- `one-tenant`: every session belongs to one tenant (private salt): the prefix is stored once;
- `public`: every session has its own tenant and the prefix was marked public first: stored once;
- `private-tenants`: every session has its own tenant, no public prefix: private salts must NOT share.
Reported per scenario: `redis_bytes` (the namespace's total, from the tier's exact stats), `separate_bytes`
(the sum of what each session would hold stored alone: its record plus every block it lists),
`unique_bytes` (the content with the shared prefix counted once: every session's record plus every block the
sessions list, blocks of equal content counted once — from what the sessions reference, not from what Redis
holds; `shared_bytes` is the part listed by more than one session), `dedup_ratio` = separate / redis, and `redis_over_unique` = redis / unique (target <= 1.3;
for `private-tenants` the target is the opposite: nothing shared, redis ≈ separate). `redis_bytes` splits into
`record_bytes` (the sessions' manifests, whose timestamps make them vary by a few bytes from run to run) and
`block_bytes` (the stored KV, the same byte for byte in every run of the same sessions: compare runs on it).
With `--cluster` the same scenarios run again, same process and sessions, on a local Redis Cluster (3 masters +
3 replicas of redis-server, started here; each row names its `redis`: single or cluster). With `--redis-url
redis+cluster://...` it runs against that Redis Cluster instead of a spawned node. On a Cluster it also reports keys and bytes
(MEMORY USAGE) per master and their max/min (`master_max_over_min`).
"""

from __future__ import annotations

import json
import time


def run_call(engine, call):
    """Run one call on an engine to its end; its `DoneEvent` (raises on an `ErrorEvent`).

    The sink gets the `DoneEvent` on the engine thread before that thread releases the session (moves it
    from the running calls to the device-resident ones): read session state only on the engine thread
    (`device_state`), never from the caller's thread."""
    from services.wire import ErrorEvent, is_terminal

    events: list = []
    engine.submit(call, events.append)
    while not events or not is_terminal(events[-1]):
        time.sleep(0.005)
    if isinstance(events[-1], ErrorEvent):
        raise RuntimeError(f"{events[-1].code}: {events[-1].message}")
    return events[-1]


def scenario(engine, name: str, system: list[int], owns: list[list[int]]) -> dict:
    from services.wire import ErrorEvent, GenerateCall

    if name == "public":
        events: list = []
        engine.mark_public({"token_ids": system}, events.append)
        while not events:
            time.sleep(0.01)
        if isinstance(events[-1], ErrorEvent):
            raise RuntimeError(f"{events[-1].code}: {events[-1].message}")
    t0, sources = time.perf_counter(), {}
    for i, own in enumerate(owns):
        tenant = "acme" if name == "one-tenant" else f"tenant{i}"
        done = run_call(engine, GenerateCall(tenant, f"s{i}", True, {"token_ids": system + own}, max_new_tokens=1))
        sources[done.usage.kv_source] = sources.get(done.usage.kv_source, 0) + 1
        before = device_state(engine, tenant, f"s{i}")
        engine.evict(tenant, f"s{i}").result()
        assert_restores_exactly(engine, tenant, f"s{i}", before)
    tier = engine.tier
    records = [tier.get_manifest("acme" if name == "one-tenant" else f"tenant{i}", f"s{i}") for i in range(len(owns))]
    return {"scenario": name, "sessions": len(owns)} | byte_figures(tier, records) | {
            "kv_sources": sources, "seconds": time.perf_counter() - t0} | spread(tier)


def byte_figures(tier, records) -> dict:
    """The byte figures of the sessions `records` stored in `tier`'s namespace (see the module doc).

    `redis_bytes` = `record_bytes` + `block_bytes`. The records (manifests) carry their creation and update
    times as JSON numbers with as many decimal digits as each float needs (mostly 16 to 18 characters now),
    so two runs of the same sessions hold records a few bytes apart; `block_bytes` is the KV content, equal
    byte for byte between runs of the same sessions (one node or a Cluster)."""
    unique, shared = unique_bytes(tier, records)
    separate = sum(tier.session_bytes(m.tenant, m.session_id, m.blocks) for m in records)
    record_bytes = sum(tier.session_bytes(m.tenant, m.session_id, []) for m in records)
    registry = sum(len(k) + len(v) for k, v in tier.client.hgetall(tier.keys.registry_key).items())
    stats = tier.stats()
    redis_bytes = stats["bytes"] - registry  # the public registry entry is not session content
    return {"redis_bytes": redis_bytes, "separate_bytes": separate, "unique_bytes": unique,
            "record_bytes": record_bytes, "block_bytes": redis_bytes - record_bytes,
            "dedup_ratio": separate / redis_bytes, "redis_over_unique": redis_bytes / unique,
            "blocks": stats["blocks"], "shared_bytes": shared}


def device_state(engine, tenant: str, session_id: str):
    """The session's device KV (`KVState`), read on the engine thread, where session state lives.

    Read from another thread just after the call's `DoneEvent`, the engine may be between taking the
    session off its running calls and putting it among the device-resident ones: `SessionManager.get` then
    finds it in neither and reads a cold copy (no device cache) from its Redis manifest. A control
    operation runs between engine steps, after the call's step has released the session."""
    def op():
        s = engine.sessions.get(tenant, session_id)
        assert s.cache is not None, f"{tenant}/{session_id} has no device cache after its call"
        return s.cache.export_state()
    return engine.scheduler.call(op).result()


def assert_restores_exactly(engine, tenant: str, session_id: str, before) -> None:
    """The session's KV read back from Redis (blocks, shared ones too, and tail) is bit-identical to the
    device cache it was offloaded from; AssertionError otherwise."""
    from services.bench.common import restore_stored

    restored = engine.scheduler.call(  # on the engine thread, which owns the store
        lambda: restore_stored(engine.runner, engine.sessions.store, engine.tier, tenant, session_id)).result()
    assert restored.export_state().equals(before), \
        f"{tenant}/{session_id}: restored cache differs from the offloaded one"


def unique_bytes(tier, records) -> tuple[int, int]:
    """(unique, shared) bytes of the sessions `records`, derived from what each one references: every
    session's record, plus every block it lists (sealed blocks and its tail) with blocks of the same content
    (`BlockRef.content`) counted once whatever their scope; `shared` = the bytes of the blocks listed by
    more than one session (each counted once). Valid for any prefix, own length, window and block size:
    only blocks some session actually lists are counted, so unique <= separate and unique > 0 always."""
    sizes: dict[bytes, int] = {}
    users: dict[bytes, int] = {}
    total = 0
    for m in records:
        total += tier.session_bytes(m.tenant, m.session_id, [])  # the record alone
        for ref, st in zip(m.blocks, tier.check(m.tenant, m.blocks)):
            if st.state != "present":
                raise RuntimeError(f"block {ref.key.hex()} of {m.tenant}/{m.session_id} is {st.state}")
            sizes[ref.content] = st.size
            users[ref.content] = users.get(ref.content, 0) + 1
    return total + sum(sizes.values()), sum(n for c, n in sizes.items() if users[c] > 1)


def spread(tier) -> dict:
    """On a Redis Cluster: keys and bytes (MEMORY USAGE) of the namespace per master, and max/min bytes."""
    from redis.cluster import RedisCluster

    from services.runtime.redis_cluster import master_usage

    if not isinstance(tier.client, RedisCluster):
        return {}
    usage = master_usage(tier.client, f"{tier.namespace}:*")
    per = [u.bytes for u in usage]
    return {"keys_per_master": [u.keys for u in usage], "bytes_per_master": per,
            "master_max_over_min": max(per) / min(per) if min(per) else float("inf")}


def run_dedup(args) -> int:
    from services.config import KvstashConfig, ModelConfig
    from services.eval.corpus import load_ids
    from services.runtime.redis_cluster import LocalRedisCluster
    from services.runtime.redis_server import RedisServer
    from services.worker.engine import Engine
    from services.worker.model_runner import ModelRunner

    runner = ModelRunner.from_config(ModelConfig(name=args.model))
    ids = load_ids(runner, args.text, args.prefix + 2000 + args.sessions * args.own)
    del runner
    system = ids[:args.prefix]
    owns = [ids[args.prefix + 2000 + i * args.own: args.prefix + 2000 + (i + 1) * args.own] for i in range(args.sessions)]
    targets: list = []
    rows = []
    try:
        targets.append(("single", RedisServer().start()) if not args.redis_url else ("given", None))
        if args.cluster:
            targets.append(("cluster", LocalRedisCluster().start()))
        for where, server in targets:
            for name in args.scenarios.split(","):
                cfg = KvstashConfig.from_dict({
                    "model": {"name": args.model}, "kv": {"spec": args.kv, "quality_sample_rate": 0},
                    "redis": {"url": server.url if server else args.redis_url,
                              "namespace": f"dedup-{name}-{int(time.time())}"},
                    "session": {"idle_timeout_s": 1e9}, "tiers": {"host_bytes": 0, "collect_interval_s": 0},
                    "prefix": {"block_tokens": args.block_tokens}})
                engine = Engine(cfg)
                try:
                    rows.append({"redis": where} | scenario(engine, name, system, owns))
                finally:
                    engine.close()
    finally:
        for _, server in targets:
            if server:
                server.stop()
    one = next((r for r in rows if r["scenario"] == "one-tenant"), rows[0])
    out = {"rows": rows, "dedup_ratio": one["dedup_ratio"], "redis_over_unique": one["redis_over_unique"],
           "restores_exact": True}
    if args.json:
        print(json.dumps(out, indent=1))
        return 0
    print(f"{args.sessions} sessions: {args.prefix} shared + {args.own} own tokens, kv {args.kv}")
    print("| Redis | scenario | Redis bytes | stored separately | unique content | dedup ratio | Redis / unique "
          "| sources |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | --- |")
    for r in rows:
        print(f"| {r['redis']} | {r['scenario']} | {r['redis_bytes']} | {r['separate_bytes']} | {r['unique_bytes']} "
              f"| {r['dedup_ratio']:.2f}x | {r['redis_over_unique']:.3f} | {r['kv_sources']} |")
    for r in rows:
        if "bytes_per_master" in r:
            print(f"{r['scenario']}: keys per master {r['keys_per_master']}, bytes per master "
                  f"{r['bytes_per_master']}, max/min {r['master_max_over_min']:.3f}")
    return 0
