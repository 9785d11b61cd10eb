"""SessionStore against a real redis-server, without a model: KV states come from small random tensors fed
through a QuantizedKVCache of a tiny shape."""

import uuid

import numpy as np
import pytest
import redis
import torch

from kvstore.codec.block_codec import content_hash
from kvstore.config import QuantConfig
from kvstore.prefix import blocks as blk
from kvstore.prefix.blocks import ModelShape
from kvstore.quant.cache import QuantizedKVCache
from kvstore.tiers.manifest import SessionManifest
from kvstore.tiers.redis_tier import RedisTier
from kvstore.tiers.store import SessionStore
from kvstore.tiers.store_types import (
    CORRUPT,
    MISSING,
    BytesWritten,
    CompressionMeasured,
    ModelIdentity,
    RestoreDecided,
    StoreSettings,
)

SPEC = "int4:g32:gv16:r32"
SHAPE = ModelShape(layers=2, kv_heads=2, head_dim=16, dtype="torch.float32")
BLOCK, CHUNK = 32, 64
PREFIX = list(range(1000, 1128))  # two whole prefill chunks: four canonical blocks
K, V = (torch.randn(1, SHAPE.kv_heads, 400, SHAPE.head_dim, generator=torch.Generator().manual_seed(s)) for s in (1, 2))


def kv_state(n: int, tail_seed: int = 0, spec: str = SPEC):
    """The state of a cache (of `spec`) fed positions [0, n): the first len(PREFIX) are shared by every
    session, the rest differ with `tail_seed`."""
    cache = QuantizedKVCache(QuantConfig.parse(spec), SHAPE.layers)
    k, v = K[:, :, :n].clone(), V[:, :, :n].clone()
    g = torch.Generator().manual_seed(100 + tail_seed)
    k[:, :, len(PREFIX):] = torch.randn(k[:, :, len(PREFIX):].shape, generator=g)
    v[:, :, len(PREFIX):] = torch.randn(v[:, :, len(PREFIX):].shape, generator=g)
    for layer in range(SHAPE.layers):
        cache.update(k, v, layer)
    return cache.export_state()


def manifest(sid: str, tokens: list[int], schedule: list[int], tenant: str = "acme", spec: str = SPEC) -> SessionManifest:
    return SessionManifest(tenant=tenant, session_id=sid, tokens=tokens, schedule=schedule, kv_tokens=0,
                           model_fingerprint="f" * 64, quant_spec=QuantConfig.parse(spec).spec(), created_at=1.0,
                           updated_at=2.0)


@pytest.fixture
def tier(redis_server):
    return RedisTier(redis.Redis.from_url(redis_server.url), namespace="st" + uuid.uuid4().hex[:8])


def make_store(tier, events=None, spec: str = SPEC, key_exps=None, **settings) -> SessionStore:
    model = ModelIdentity("f" * 64, SHAPE, QuantConfig.parse(spec), "cpu", key_exps)
    kw = dict(block_tokens=BLOCK, prefill_chunk=CHUNK, codec_threads=2) | settings
    return SessionStore(tier, model, StoreSettings(**kw), events.append if events is not None else (lambda e: None))


def session(n_extra: int, seed: int):
    """(tokens, schedule, state) of a session whose prompt starts with PREFIX, prefilled in chunk passes."""
    tokens = PREFIX + [seed * 1000 + i for i in range(n_extra)]
    return tokens, [CHUNK, CHUNK, n_extra - 1, 1], kv_state(len(tokens), seed)


def refcount(tier, tenant, ref) -> int:
    return int(tier.client.hget(tier.block_key(tenant, ref), "r") or 0)


def test_save_then_restore_is_bit_exact_from_redis_and_from_the_host_tier(tier):
    events = []
    store = make_store(tier, events, host_bytes=1 << 24)
    tokens, schedule, state = session(80, 1)
    saved = store.save(manifest("a", tokens, schedule), state, [], None)
    assert saved.kv_tokens == state.num_tokens and len(saved.blocks) == 5 + 1  # 5 sealed blocks and the tail
    assert tier.get_manifest("acme", "a").blocks == saved.blocks and saved.redis_bytes > 0
    host = store.restore("acme", saved.blocks, saved.kv_tokens)
    assert host.tier == "host" and host.state.equals(state)
    cold = make_store(tier).restore("acme", saved.blocks, saved.kv_tokens)  # a worker with nothing warm
    assert cold.tier == "redis" and cold.state.equals(state)
    assert any(isinstance(e, BytesWritten) and e.nbytes > 0 for e in events)
    assert any(isinstance(e, CompressionMeasured) and e.total > 1 for e in events)


def test_shared_prefix_blocks_are_stored_once_and_adopted(tier):
    store = make_store(tier)
    (ta, sa, a), (tb, sb, b) = session(80, 1), session(90, 2)
    saved_a = store.save(manifest("a", ta, sa), a, [], None)
    saved_b = store.save(manifest("b", tb, sb), b, [], None)
    shared = [r for r in saved_a.blocks if r in saved_b.blocks]
    assert len(shared) == len(PREFIX) // BLOCK and all(refcount(tier, "acme", r) == 2 for r in shared)
    assert tier.stats()["blocks"] == len(shared) + 2 * 2  # each keeps its own 5th block and tail
    assert store.restore("acme", saved_b.blocks, saved_b.kv_tokens).state.equals(b)
    # another tenant shares nothing: its names are salted with its own salt
    saved_c = store.save(manifest("c", ta, sa, tenant="other"), a, [], None)
    assert not {r.key for r in saved_c.blocks} & {r.key for r in saved_a.blocks}
    events = []
    adopter = make_store(tier, events)
    adoption = adopter.adopt("acme", PREFIX + [7, 8, 9])
    assert adoption.tokens == len(PREFIX) and (adoption.from_trie, adoption.from_redis) == (0, len(shared))
    parts, _ = blk.split(adoption.state, BLOCK, len(shared))
    assert [r.content for r in shared] == [content_hash(p) for p in parts]  # the very blocks a stored
    assert RestoreDecided("prefix", "load", len(shared)) in events
    assert adopter.adopt("acme", PREFIX[:CHUNK - 1]) is None  # no whole chunk


def test_missing_and_corrupt_blocks_are_reported_as_such(tier):
    store = make_store(tier)
    tokens, schedule, state = session(80, 1)
    saved = store.save(manifest("a", tokens, schedule), state, [], None)
    key = tier.block_key("acme", saved.blocks[4])
    data = tier.client.hget(key, "d")
    tier.client.hset(key, "d", data[:-9] + bytes([data[-9] ^ 1]) + data[-8:])
    assert store.restore("acme", saved.blocks, saved.kv_tokens).reason == CORRUPT
    tier.client.hset(key, "d", data[:len(data) // 2])
    assert store.restore("acme", saved.blocks, saved.kv_tokens).reason == CORRUPT  # truncated
    tier.client.delete(key)
    restored = store.restore("acme", saved.blocks, saved.kv_tokens)
    assert restored.state is None and restored.reason == MISSING
    other = make_store(tier, prefill_chunk=2 * CHUNK)  # another configuration: its blocks are not these
    assert other.restore("acme", saved.blocks, saved.kv_tokens + 1).state is None


def test_delete_releases_references_and_the_last_one_removes_the_block(tier):
    store = make_store(tier)
    (ta, sa, a), (tb, sb, b) = session(80, 1), session(90, 2)
    saved_a = store.save(manifest("a", ta, sa), a, [], None)
    saved_b = store.save(manifest("b", tb, sb), b, [], None)
    shared = [r for r in saved_a.blocks if r in saved_b.blocks]
    assert store.delete("acme", "a") and not store.delete("acme", "a")
    assert all(refcount(tier, "acme", r) == 1 for r in shared)
    assert not any(tier.client.exists(tier.block_key("acme", r)) for r in saved_a.blocks if r not in shared)
    assert store.restore("acme", saved_b.blocks, saved_b.kv_tokens).state.equals(b)
    assert store.delete("acme", "b")
    assert tier.stats()["blocks"] == 0 and not any(tier.client.exists(tier.block_key("acme", r)) for r in shared)


def test_saving_again_replaces_the_record_and_releases_blocks_no_longer_listed(tier):
    store = make_store(tier)
    tokens, schedule, state = session(80, 1)
    first = store.save(manifest("a", tokens, schedule), state, [], None)
    longer = tokens + [5] * 40
    state2 = kv_state(len(longer), 1)
    second = store.save(manifest("a", longer, schedule + [40]), state2, first.blocks, first.manifest_sha)
    assert tier.get_manifest("acme", "a").blocks == second.blocks
    assert not tier.client.exists(tier.block_key("acme", first.blocks[-1]))  # the old tail
    assert store.restore("acme", second.blocks, second.kv_tokens).state.equals(state2)


def test_public_prefix_is_shared_across_tenants(tier):
    store = make_store(tier, trie_bytes=1 << 24)
    n = store.public_tokens(len(PREFIX) + 5)
    assert n == len(PREFIX)
    sealed = QuantizedKVCache.from_state(kv_state(n))
    sealed.seal_all()
    published = store.publish(PREFIX, sealed.export_state())
    assert published.registered and published.tokens == n
    assert store.hot_tokens("anyone", PREFIX + [1]) == n
    other = make_store(tier)
    assert other.refresh_public() == n // BLOCK
    adoption = other.adopt("tenant-b", PREFIX + [1, 2])
    assert adoption.tokens == n and adoption.from_redis == n // BLOCK
    with pytest.raises(ValueError):
        store.public_tokens(CHUNK - 2)


@pytest.mark.parametrize("qk", [False, True])
def test_cold_mode_restores_the_decoded_state_the_same_every_time_and_keeps_cold_blocks(tier, qk):
    from kvstore.codec.registry import codec_of

    cold = QuantConfig.parse("int2:g64:gv16:s1" + ":qk" * qk)
    exps = np.arange(SHAPE.layers * SHAPE.kv_heads * SHAPE.head_dim).reshape(
        SHAPE.layers, SHAPE.kv_heads, SHAPE.head_dim).astype(np.int8) % 5 - 2 if qk else None
    store = make_store(tier, block_tokens=64, sharing=False, cold=cold, key_exps=exps)
    tokens, schedule, state = session(80, 1)
    saved = store.save(manifest("a", tokens, schedule), state, [], None)
    assert len(saved.blocks) == 3 and all(codec_of(tier.client.hget(tier.block_key("acme", r), "d")).name == "cold"
                                          for r in saved.blocks[:-1])
    first = store.restore("acme", saved.blocks, saved.kv_tokens).state
    assert first.num_tokens == state.num_tokens and not first.equals(state)  # lossy: the warm decoded cache
    assert make_store(tier, block_tokens=64, sharing=False).restore(  # a worker without cold mode reads them too
        "acme", saved.blocks, saved.kv_tokens).state.equals(first)
    again = store.save(manifest("a", tokens, schedule), first, saved.blocks, saved.manifest_sha)
    assert again.blocks[:-1] == saved.blocks[:-1]  # resumed cold blocks are kept, never re-quantized


def test_cold_mode_stores_the_tail_with_bf16_sinks_and_cw_window_codes_and_again_unchanged(tier):
    spec, cold = "int4:g32:gv16:r32:w8:s4", QuantConfig.parse("int2:g64:gv16:s1:cw43")
    store = make_store(tier, spec=spec, block_tokens=64, sharing=False, cold=cold)
    tokens, schedule, _ = session(80, 1)
    state = kv_state(len(tokens), 1, spec)
    saved = store.save(manifest("w", tokens, schedule, spec=spec), state, [], None)
    first = store.restore("acme", saved.blocks, saved.kv_tokens).state
    n = len(saved.blocks) - 1
    (block0, *_), tail = blk.split(state, 64, n)
    (got0, *_), got_tail = blk.split(first, 64, n)
    assert got_tail.equals(store.coder.cold.warm_tail(tail)) and not got_tail.equals(tail)
    win = dict(got_tail.tensors)
    for layer in range(SHAPE.layers):
        for name, step in (("k_win", 16), ("v_win", 32)):  # cw43: keys keep 4 bits, values 3
            codes = torch.from_numpy(win[f"{layer}.{name}"]).int()
            inner = codes[codes.abs() < 127]
            assert inner.numel() and bool((inner % step == 0).all())
        sink = dict(got0)[f"{layer}.k_sink"]  # block 0's sinks: fp32 held at bf16
        assert torch.equal(torch.from_numpy(sink), torch.from_numpy(sink).bfloat16().float())
        assert not torch.equal(torch.from_numpy(sink), torch.from_numpy(dict(block0)[f"{layer}.k_sink"]))
    again = store.save(manifest("w", tokens, schedule, spec=spec), first, saved.blocks, saved.manifest_sha)
    assert again.blocks == saved.blocks  # the resumed session stores to the same blocks and tail: no drift
    assert store.restore("acme", again.blocks, again.kv_tokens).state.equals(first)
