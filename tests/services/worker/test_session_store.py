"""The worker's stored-KV paths in process: a real Engine (tiny random Llama), a real redis-server.

Every exactness check compares against a twin session that took the same path but never left the device.
"""

import random
import time
import uuid

import pytest
import redis

from services.config import KvstashConfig
from services.runtime.redis_server import RedisServer
from services.wire import DoneEvent, GenerateCall, PrefixSharedEvent, TokensEvent, Usage, is_terminal
from services.worker.engine import Engine

SPEC = "int4:g32:gv16:r32"  # 4-bit keys: their codes are re-packed channel-major when stored
CHUNK = 64  # small prefill chunks so short prompts have shareable prefixes
rng = random.Random(7)
SYSTEM = [rng.randrange(1000, 20000) for _ in range(200)]  # a shared prompt prefix: 3 chunks (192 tokens)


def make_engine(model_dir, url, **sections) -> Engine:
    d = {"model": {"name": str(model_dir)}, "kv": {"spec": SPEC, "quality_sample_rate": 0},
         "redis": {"url": url, "namespace": "kv" + uuid.uuid4().hex[:8]},
         "prefix": {"prefill_chunk": CHUNK}, "session": {"idle_check_interval_s": 3600, "idle_timeout_s": 3600},
         "tiers": {"host_bytes": 0, "collect_interval_s": 0}}
    for section, values in sections.items():
        d.setdefault(section, {}).update(values)
    return Engine(KvstashConfig.from_dict(d))


@pytest.fixture
def engine(tiny_model_dir, redis_server):
    eng = make_engine(tiny_model_dir, redis_server.url)
    yield eng
    eng.close()


def call_events(engine, call: GenerateCall) -> list:
    """Every event of one call, to its terminal one."""
    events: list = []
    engine.submit(call, events.append)
    deadline = time.monotonic() + 120
    while not events or not is_terminal(events[-1]):
        assert time.monotonic() < deadline
        time.sleep(0.005)
    return events


def run(engine, tenant, sid, ids=None, n=12, create=True) -> tuple[list[int], Usage]:
    events = call_events(engine, GenerateCall(tenant, sid, create, {"token_ids": ids} if ids else None, n))
    assert isinstance(events[-1], DoneEvent), events[-1]
    return [t for e in events if isinstance(e, TokensEvent) for t in e.ids], events[-1].usage


def block_keys(engine, tenant, sid) -> list[str]:
    m = engine.tier.get_manifest(tenant, sid)
    return [engine.tier.block_key(tenant, r) for r in m.blocks]


def refcount(engine, key) -> int:
    return int(engine.tier.client.hget(key, "r") or 0)


def test_shared_prefix_is_stored_once_and_a_deduplicated_session_resumes_exactly(engine):
    a, ua = run(engine, "acme", "a", SYSTEM + [5, 6, 7])
    b, ub = run(engine, "acme", "b", SYSTEM + [8, 9])
    twin, _ = run(engine, "acme", "b-twin", SYSTEM + [8, 9], n=24)  # same path, never leaves the device
    assert ua.kv_source == "new" and ub.kv_source == "prefix" and ub.cached_tokens == 3 * CHUNK
    assert ub.cached_tier == "device"  # the prefix was hot in the worker's trie
    for sid in ("a", "b"):
        engine.evict("acme", sid).result()
    ka, kb = block_keys(engine, "acme", "a"), block_keys(engine, "acme", "b")
    shared = [k for k in ka if k in kb]
    # every canonical block a has sealed (its window still holds the prefix's last block in full precision)
    per = engine.sessions.block_tokens
    assert len(shared) == min(3 * CHUNK // per, len(ka) - 1) >= 2 and all(refcount(engine, k) == 2 for k in shared)
    assert engine.tier.delete_session("acme", "a")
    assert all(refcount(engine, k) == 1 for k in shared)  # b's copy is intact
    rest, u = run(engine, "acme", "b", create=False)
    assert u.kv_source == "restored" and b + rest == twin


def test_lost_shared_blocks_are_recomputed_exactly_from_the_history(engine):
    run(engine, "acme", "a", SYSTEM + [1])
    b, _ = run(engine, "acme", "b", SYSTEM + [2, 3])
    twin, _ = run(engine, "acme", "twin", SYSTEM + [2, 3], n=24)
    engine.evict("acme", "b").result()
    for key in block_keys(engine, "acme", "b"):
        engine.tier.client.delete(key)
    engine.sessions.store.store.trie = type(engine.sessions.store.store.trie)(0)  # the hot copy is gone too
    rest, u = run(engine, "acme", "b", create=False)
    assert u.kv_source == "recomputed"  # replayed: canonical passes, SEAL, then b's own passes
    assert b + rest == twin


def test_private_prefixes_never_cross_tenants_and_public_ones_do(engine):
    run(engine, "acme", "s", SYSTEM + [1])
    _, u = run(engine, "zeta", "s", SYSTEM + [1])
    assert u.kv_source == "new"  # no hit on another tenant's prefix
    lookups = engine.metrics.prefix_lookups.labels("hit")._value.get()
    for t in ("acme", "zeta"):
        engine.evict(t, "s").result()
    ka, kz = block_keys(engine, "acme", "s"), block_keys(engine, "zeta", "s")
    assert not set(ka) & set(kz)
    assert all("}:acme:" in k for k in ka) and all("}:zeta:" in k for k in kz)
    events: list = []
    engine.mark_public({"token_ids": SYSTEM}, events.append)
    while not events:
        time.sleep(0.01)
    assert events[0] == PrefixSharedEvent(prompt_tokens=len(SYSTEM), shared_tokens=3 * CHUNK, newly_registered=True)
    outs = {}
    for t in ("acme", "zeta", "third"):
        outs[t], u = run(engine, t, "p", SYSTEM + [4, 4])
        assert u.kv_source == "prefix" and u.cached_tokens == 3 * CHUNK
    assert outs["acme"] == outs["zeta"] == outs["third"]  # the same public KV
    assert engine.metrics.prefix_lookups.labels("hit")._value.get() == lookups + 3
    for t in ("acme", "zeta"):
        engine.evict(t, "p").result()
    shared = set(block_keys(engine, "acme", "p")) & set(block_keys(engine, "zeta", "p"))
    assert len(shared) == 3 * CHUNK // engine.sessions.block_tokens and all("}:~public:" in k for k in shared)


def test_corrupt_and_truncated_blocks_are_caught_and_recomputed_exactly(engine):
    ids = [rng.randrange(1000, 20000) for _ in range(150)]
    run(engine, "acme", "seed", ids, n=1)  # its prefix goes hot: every later session takes the same path
    ref, _ = run(engine, "acme", "ref", ids, n=30)
    for damage in ("flip", "truncate"):
        first, _ = run(engine, "acme", damage, ids, n=10)
        engine.evict("acme", damage).result()
        key = block_keys(engine, "acme", damage)[1]
        blob = bytearray(engine.tier.client.hget(key, "d"))
        if damage == "flip":
            blob[len(blob) // 3] ^= 0x10
        else:
            blob = blob[:-7]
        engine.tier.client.hset(key, "d", bytes(blob))
        before = engine.metrics.recomputes.labels("corrupt")._value.get()
        rest, u = run(engine, "acme", damage, n=20, create=False)
        assert u.kv_source == "recomputed" and first + rest == ref
        assert engine.metrics.recomputes.labels("corrupt")._value.get() == before + 1


def test_a_long_session_resumes_through_several_round_trips_and_a_late_missing_block_is_recomputed(
        tiny_model_dir, redis_server):
    """Blocks of 32 tokens and a tail: three pipelined round trips (kvstore.tiers.store.FETCH_CHUNK) that overlap
    decoding; the tail comes first, so a block of the last round trip going missing is found late."""
    eng = make_engine(tiny_model_dir, redis_server.url, prefix={"block_tokens": 32})
    try:
        ids = [rng.randrange(1000, 20000) for _ in range(380)]
        ref, _ = run(eng, "acme", "ref", ids, n=30)
        first, _ = run(eng, "acme", "long", ids, n=10)
        eng.evict("acme", "long").result()
        keys = block_keys(eng, "acme", "long")
        assert len(keys) >= 3 * 4 - 2  # blocks + the tail: three round trips of up to 4
        mid, u = run(eng, "acme", "long", n=10, create=False)
        assert u.kv_source == "restored" and first + mid == ref[:20]
        eng.evict("acme", "long").result()
        keys = block_keys(eng, "acme", "long")
        eng.tier.client.hdel(keys[-2], "d")  # the last block: fetched in the last round trip
        before = eng.metrics.recomputes.labels("missing")._value.get()
        rest, u = run(eng, "acme", "long", n=10, create=False)
        assert u.kv_source == "recomputed" and first + mid + rest == ref
        assert eng.metrics.recomputes.labels("missing")._value.get() == before + 1
    finally:
        eng.close()


def test_warm_host_tier_serves_a_resume_without_redis(tiny_model_dir, redis_server):
    eng = make_engine(tiny_model_dir, redis_server.url, tiers={"host_bytes": 64 << 20})
    try:
        ids = [rng.randrange(1000, 20000) for _ in range(100)]
        run(eng, "acme", "seed", ids, n=1)
        first, _ = run(eng, "acme", "h", ids)
        eng.evict("acme", "h").result()
        for key in block_keys(eng, "acme", "h"):  # Redis loses the KV; the host tier still has it
            eng.tier.client.delete(key)
        rest, u = run(eng, "acme", "h", create=False)
        twin, _ = run(eng, "acme", "t", ids, n=24)
        assert u.kv_source == "restored" and u.cached_tier == "host" and first + rest == twin
    finally:
        eng.close()


def test_expensive_loads_are_recomputed_by_the_cost_model(engine):
    ids = [rng.randrange(1000, 20000) for _ in range(100)]
    run(engine, "acme", "seed", ids, n=1)
    first, _ = run(engine, "acme", "c", ids)
    twin, _ = run(engine, "acme", "twin", ids, n=24)
    engine.evict("acme", "c").result()
    engine.sessions.store.store.cost.restore_s_per_block = 10.0  # as if Redis were far away
    before = engine.metrics.load_decisions.labels("resume", "recompute")._value.get()
    rest, u = run(engine, "acme", "c", create=False)
    assert u.kv_source == "recomputed" and first + rest == twin
    assert engine.metrics.load_decisions.labels("resume", "recompute")._value.get() > before


def test_device_budget_offloads_least_recently_used_sessions(tiny_model_dir, redis_server):
    eng = make_engine(tiny_model_dir, redis_server.url, tiers={"device_bytes": 1})
    try:
        run(eng, "acme", "old", [5] * 40)
        run(eng, "acme", "new", [6] * 40)
        assert eng.sessions.offload_idle() == 2  # both over a 1-byte budget, oldest first
        assert not eng.sessions.active and eng.tier.get_manifest("acme", "old").blocks
    finally:
        eng.close()


@pytest.mark.parametrize("policy", ["allkeys-lru", "volatile-lru"])
def test_redis_maxmemory_eviction_of_blocks_leads_to_exact_recomputation(tiny_model_dir, tmp_path, policy):
    """Redis under memory pressure evicts KV blocks (with volatile-lru and redis.kv_ttl_s, only those: the
    documented setting); sessions then recompute from their durable histories, token for token."""
    with RedisServer(data_dir=str(tmp_path)) as server:
        eng = make_engine(tiny_model_dir, server.url, redis={"kv_ttl_s": 86400 if policy == "volatile-lru" else 0})
        try:
            base = [rng.randrange(1000, 20000) for _ in range(120)]
            run(eng, "acme", "seed", base, n=1)  # the shared prefix goes hot: every session below adopts it
            sids = [f"s{i}" for i in range(4)]
            prompts = {sid: base + [100 + i] * (i + 1) for i, sid in enumerate(sids)}
            firsts = {sid: run(eng, "acme", sid, prompts[sid], n=10)[0] for sid in sids}
            twins = {sid: run(eng, "acme", f"twin-{sid}", prompts[sid], n=30)[0] for sid in sids}
            for sid in sids:
                eng.evict("acme", sid).result()
            client = redis.Redis.from_url(server.url)
            time.sleep(2.1)  # the LRU clock moves on: the manifests below are touched after the blocks
            for sid in sids + ["seed"]:
                eng.tier.get_manifest("acme", sid)
            blocks = sorted({k for sid in sids for k in block_keys(eng, "acme", sid)})
            held = sum(client.memory_usage(k) for k in blocks)
            client.config_set("maxmemory-policy", policy)
            client.config_set("maxmemory-samples", 10)
            client.config_set("maxmemory", client.info("memory")["used_memory"] + 4096)
            for i in range(held // 2 // 1024):  # room for about half the blocks' bytes must be made
                client.set(f"filler:{i}", b"x" * 900, ex=3600)
            assert client.info("stats")["evicted_keys"] > 0
            gone = sum(not client.exists(k) for k in blocks)
            assert gone > 0, "no KV block was evicted"
            before = eng.metrics.recomputes.labels("missing")._value.get()
            for sid in sids:  # the durable histories were never evicted
                assert eng.tier.get_manifest("acme", sid).tokens[:len(prompts[sid])] == prompts[sid]
            for sid in sids:
                rest, u = run(eng, "acme", sid, n=20, create=False)
                assert firsts[sid] + rest == twins[sid]
            assert eng.metrics.recomputes.labels("missing")._value.get() > before
        finally:
            eng.close()


@pytest.mark.parametrize("cold_spec", ["int2:g64:gv16:s1", "int2:g64:gv16:s1:qk"])  # qk: the model's key weights
def test_cold_mode_stores_fewer_bytes_dedupes_and_resumes_exactly_from_the_decoded_cache(tiny_model_dir,
                                                                                         redis_server, cold_spec):
    from kvstore.codec.registry import codec_of

    # no prefix adoption: both sessions take one path, so their histories and caches are equal
    cold = make_engine(tiny_model_dir, redis_server.url, tiers={"cold_spec": cold_spec},
                       prefix={"enabled": False})
    plain = make_engine(tiny_model_dir, redis_server.url, prefix={"enabled": False})
    try:
        prompt = SYSTEM + [rng.randrange(1000, 20000) for _ in range(150)]
        for eng in (cold, plain):
            outs = []
            for sid in ("a", "a2"):  # two sessions with one history
                outs.append(run(eng, "acme", sid, prompt)[0])
                eng.evict("acme", sid).result()
            assert outs[0] == outs[1]
        ka, ka2 = block_keys(cold, "acme", "a"), block_keys(cold, "acme", "a2")
        blobs = [cold.tier.client.hget(k, "d") for k in ka[:-1]]
        assert len(blobs) >= 4 and all(codec_of(b).name == "cold" for b in blobs)  # every block went cold (none were shared)
        assert ka[:-1] == ka2[:-1] and all(refcount(cold, k) == 2 for k in ka[:-1])  # equal cold blocks dedupe
        size = lambda eng, keys: sum(len(eng.tier.client.hget(k, "d")) for k in keys)  # noqa: E731
        kp = block_keys(plain, "acme", "a")
        assert size(cold, ka[:-1]) < 0.75 * size(plain, kp[:-1])  # 2-bit cold (value metadata dominates at gv16)
        r1, u1 = run(cold, "acme", "a", create=False)
        r2, u2 = run(cold, "acme", "a2", create=False)
        assert u1.kv_source == u2.kv_source == "restored" and r1 == r2  # exact w.r.t. the decoded cache
        cold.evict("acme", "a").result()
        again = block_keys(cold, "acme", "a")
        assert again[:len(ka) - 1] == ka[:-1]  # resumed cold blocks are kept, never re-quantized
        r3, _ = run(cold, "acme", "a", create=False)
        r4, _ = run(cold, "acme", "a2", create=False)
        assert r3 == r4
    finally:
        cold.close()
        plain.close()
