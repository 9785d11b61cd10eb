"""`KVStore`: a worker's view of stored KV — blocks in the host tier and Redis, and the hot prefix trie.

It turns a session's cache into content blocks plus a tail and back (kvstore.prefix.blocks), names each
block (a chain hash for canonical blocks, so other sessions with the same prompt find and share it; a
content key otherwise), writes only the blocks Redis does not hold yet, and finds stored prefixes a new
session can adopt instead of prefilling.

Invariants:
- A block is shared only when its stored content hash equals this session's (`RedisTier` refuses
  conflicts; this store then files the block under its content key instead), so `load` returns exactly
  the state `save` was given.
- Tenants never share private blocks: every key is salted with the tenant's salt (derived here from the
  authenticated tenant and `prefix.salt_key`), except blocks of registered public prefixes.
- `load` and `adopt` never raise for bad stored data: they return None with the reason, and the caller
  recomputes from the token history.
- Cold mode (`tiers.cold_spec`, lossy, opt-in): a session's blocks that Redis does not hold yet, public
  ones excepted, are stored in the cold format (kvstore.codec.cold_block) under content keys of their
  *warm* content, and `load` returns the warm cache: exact with respect to what was stored, not to the
  session's original codes. Blocks the session holds cold and that did not change keep their cold copy,
  so resuming and offloading again never re-quantizes twice. Chain-named (adoptable) blocks stay lossless.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Generator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from kvstore.codec import rans
from kvstore.codec.block import block_header, content_hash, decode_block, encode_block
from kvstore.codec.cold_block import check_cold, decode_cold, encode_cold, is_cold
from kvstore.codec.container import HEADER_SIZE, ContainerError
from kvstore.codec.kv import decode_kv, encode_kv
from kvstore.config import QuantConfig
from kvstore.hashing import hash_fields
from kvstore.prefix import blocks as blk
from kvstore.prefix.canonical import adoption_points, canonical_tokens, passes
from kvstore.prefix.hashing import BlockGrid, BlockHash, KvDomain, Salt, chain, content_key
from kvstore.prefix.trie import PrefixTrie, TrieNode
from kvstore.quant.cache import QuantizedKVCache
from kvstore.tiers.host_tier import HostTier
from kvstore.tiers.manifest import BlockRef
from kvstore.tiers.policy import LoadCost
from kvstore.tiers.redis_tier import BlockRefused, RedisTier, StaleManifest
from services.config import KvstashConfig
from services.metrics import WorkerMetrics
from services.wire import Tier
from services.worker.model_runner import ModelRunner
from services.worker.session import Session

log = logging.getLogger(__name__)
_ZERO = bytes(32)
_FETCH_CHUNK = 2  # blocks per Redis round trip on a resume (decoding overlaps the next round trip)


def _tail_content(blob: bytes) -> bytes:
    """A tail's content id: a hash of its container header, which holds the checksum of everything else
    (`decode_kv` verifies it), so the tail's megabytes are hashed once, not twice, on a resume."""
    return hash_fields([bytes(blob[:HEADER_SIZE])], person=b"kvstash-tail")


@dataclass
class Loaded:
    """What `KVStore.load` found: the cache and the tier (Tier.HOST, or Tier.REDIS when any block came from
    Redis), or None and why ("missing", "corrupt")."""

    cache: QuantizedKVCache | None
    tier: Tier = Tier.NONE
    reason: str = ""


@dataclass
class Adoption:
    """A stored prefix a new session takes over: its cache (all sealed) and how many tokens it covers."""

    cache: QuantizedKVCache
    tokens: int
    from_trie: int  # blocks found hot in the trie
    from_redis: int  # blocks fetched from Redis


class KVStore:
    def __init__(self, runner: ModelRunner, tier: RedisTier, cfg: KvstashConfig, metrics: WorkerMetrics):
        self.runner, self.tier, self.metrics = runner, tier, metrics
        self.quant: QuantConfig = cfg.quant
        self.block_tokens, self.chunk = cfg.block_tokens, cfg.prefix.prefill_chunk
        self.sharing = cfg.prefix.enabled and not self.quant.evict
        self.grid = BlockGrid(self.block_tokens, self.quant.sinks)
        self.domain = KvDomain(runner.fingerprint, self.quant.spec(), self.chunk, self.block_tokens, runner.device.type)
        self.shape = runner.shape
        self.level = cfg.kv.codec_level
        self.cold = cfg.cold  # lossy cold mode (tiers.cold_spec) or None
        if self.cold is not None:
            check_cold(self.quant, self.cold, self.block_tokens, self.shape.layers)
            self.cold_domain = KvDomain(runner.fingerprint, f"{self.quant.spec()}>cold:{self.cold.spec()}",
                                        self.chunk, self.block_tokens, runner.device.type)
        self._salt_key = cfg.prefix.salt_key.encode()
        self.public_salt = Salt.public_salt(self._salt_key)
        self.public: set[bytes] = set()  # chain hashes of registered public prefix blocks
        self.trie = PrefixTrie(cfg.prefix.trie_bytes if self.sharing else 0)
        self.host = HostTier(cfg.tiers.host_bytes)
        self.cost = LoadCost()
        self._pool = ThreadPoolExecutor(cfg.tiers.codec_threads or os.cpu_count() or 1, thread_name_prefix="kvcodec")
        self.warm_up()

    def warm_up(self) -> None:
        """Code a small random session once (2 blocks and a tail, through every codec this store uses), so the
        codec's kernels are compiled or loaded from numba's cache now: on a first offload or resume that
        time would be taken for the cost of loading (`LoadCost`) and steer resumes to recomputation."""
        rans.warm_up()  # the vector kernel too, which small sessions' streams do not reach
        cache, g = self.runner.new_cache(self.quant), torch.Generator().manual_seed(0)
        n, sh = self.quant.sinks + 2 * self.block_tokens + self.quant.residual + self.quant.key_group, self.shape
        for layer in range(sh.layers):
            k, v = (torch.randn(1, sh.kv_heads, n, sh.head_dim, generator=g).to(self.runner.device, self.runner.dtype)
                    for _ in "kv")
            cache.update(k, v, layer)
        state = cache.export_state()
        parts, tail = blk.split(state, self.block_tokens, blk.whole_blocks(state, self.block_tokens))
        kw = dict(quant=self.quant, shape=sh, block_tokens=self.block_tokens, model_fingerprint="warm-up")
        for i, p in enumerate(parts):
            decode_block(encode_block(p, index=i, **kw).data, index=i, **kw)
            if self.cold is not None:
                decode_cold(encode_cold(p, cold=self.cold, index=i, **kw)[0].data, index=i, **kw)
        decode_kv(encode_kv(tail, model_fingerprint="warm-up", level=self.level))

    # ---- naming ------------------------------------------------------------------------------------
    def salt(self, tenant: str) -> Salt:
        return Salt.for_tenant(tenant, self._salt_key)

    def chain(self, tenant: str, tokens: list[int], count: int | None = None) -> list[tuple[BlockHash, bool]]:
        """(chain hash, public?) of the whole blocks of `tokens`: blocks of a registered public prefix are
        hashed with the public salt, the rest (chained on) with the tenant's."""
        n_pub = 0
        if self.public:
            for h in chain(tokens, self.grid, self.domain, self.public_salt, count=count):
                if h.digest not in self.public:
                    break
                n_pub += 1
        mine = self.salt(tenant)
        hashes = chain(tokens, self.grid, self.domain, lambda i: self.public_salt if i < n_pub else mine, count=count)
        return [(h, i < n_pub) for i, h in enumerate(hashes)]

    def _key(self, tenant: str, ref: BlockRef) -> str:
        return self.tier.block_key(tenant, ref)

    # ---- writing -------------------------------------------------------------------------------------
    def save(self, s: Session) -> int:
        """Store `s.cache` as blocks + tail and commit the manifest; sets `s.blocks`. Returns the session's
        Redis bytes (its record plus every block it lists). Raises on storage failure (nothing half-done is
        referenced: a failed commit leaves the previous manifest in force)."""
        state = s.cache.export_state()
        n = blk.whole_blocks(state, self.block_tokens)
        parts, tail = blk.split(state, self.block_tokens, n)
        canon = canonical_tokens(s.schedule, self.chunk) if self.sharing else 0
        named = self.chain(s.tenant, s.tokens[:canon])[:n]
        salt = self.salt(s.tenant)
        contents = [content_hash(p) for p in parts]
        refs = [BlockRef(named[i][0].digest, c, named[i][1]) if i < len(named)
                else BlockRef(content_key(c, self.domain, salt).digest, c) for i, c in enumerate(contents)]
        tail_blob = encode_kv(tail, model_fingerprint=self.runner.fingerprint, level=self.level)
        tail_content = _tail_content(tail_blob)
        if self.cold is not None:  # blocks held cold and unchanged since (a resumed session) keep their copy
            for i, prev in enumerate(s.blocks[:min(n, len(s.blocks) - 1)]):
                if prev.content == contents[i]:
                    refs[i] = prev
        refs.append(BlockRef(content_key(tail_content, self.domain, salt).digest, tail_content))
        blobs: dict[bytes, bytes] = {refs[-1].key: tail_blob}
        raw = state.nbytes
        for _ in range(3):
            held = set(s.blocks)
            todo = [i for i, r in enumerate(refs) if r not in held and r.key not in blobs]
            status = dict(zip(todo, self.tier.check(s.tenant, [refs[i] for i in todo]))) if todo else {}
            clashes = [i for i in todo if status[i].state == "conflict"]
            for i in clashes:  # same tokens, other bits (another kernel's rounding): keep a copy of our own
                refs[i] = BlockRef(content_key(refs[i].content, self.domain, salt).digest, refs[i].content)
            if clashes:
                status.update(zip(clashes, self.tier.check(s.tenant, [refs[i] for i in clashes])))
            absent = [i for i in todo if status[i].state == "absent" and refs[i].key not in blobs]
            if self.cold is not None:  # the session's own blocks go cold; public ones stay lossless
                self._store_cold(s.tenant, parts, refs, [i for i in absent if not refs[i].public], blobs)
                absent = [i for i in absent if refs[i].public]
            for i, enc in zip(absent, self._pool.map(
                    lambda i: encode_block(parts[i], quant=self.quant, shape=self.shape, block_tokens=self.block_tokens,
                                           index=i, model_fingerprint=self.runner.fingerprint), absent)):
                blobs[refs[i].key] = enc.data
            m = s.manifest(self.runner.fingerprint, self.quant.spec(), blocks=refs, kv_tokens=state.num_tokens)
            try:
                done = self.tier.commit(m, s.blocks, blobs, expect_sha=s.manifest_sha or "*")
            except BlockRefused as e:  # a block vanished or appeared meanwhile: look again
                log.info("offload of %s/%s raced another writer (%s); retrying", s.tenant, s.session_id, e)
                for r in e.missing + e.conflicts:
                    blobs.pop(r.key, None)
                continue
            except StaleManifest:  # another writer's record: ours replaces it and releases its blocks
                record = self.tier.get_record(s.tenant, s.session_id)
                log.warning("manifest of %s/%s was rewritten by another writer; this worker's copy wins",
                            s.tenant, s.session_id)
                s.blocks, s.manifest_sha = (record[0].blocks, record[1]) if record else ([], None)
                continue
            s.blocks, s.stored_kv_tokens, s.manifest_sha = refs, state.num_tokens, done.sha1
            for r in refs:
                if r.key in blobs:
                    self.host.put(self._key(s.tenant, r), blobs[r.key])
            written = sum(len(b) for b in blobs.values())
            self.metrics.offload_bytes.inc(written)
            stored = sum(x.size for x in self.tier.check(s.tenant, refs))
            fp16 = 2 * 2 * state.num_tokens * self.shape.layers * self.shape.kv_heads * self.shape.head_dim
            if stored and raw:
                self.metrics.compression_ratio.labels("quantization").set(fp16 / raw)  # fp16 KV -> device format
                self.metrics.compression_ratio.labels("codec").set(raw / stored)  # device format -> stored blocks
                self.metrics.compression_ratio.labels("total").set(fp16 / stored)
            return done.bytes + stored
        raise RuntimeError(f"offload of {s.tenant}/{s.session_id} kept racing other writers")

    def _store_cold(self, tenant: str, parts, refs: list[BlockRef], idx: list[int], blobs: dict) -> None:
        """Cold-encode blocks `idx`: their refs become content keys of the warm content, and blobs are added
        for the ones Redis does not hold yet."""
        salt = self.salt(tenant)
        coded = list(self._pool.map(
            lambda i: encode_cold(parts[i], quant=self.quant, cold=self.cold, shape=self.shape,
                                  block_tokens=self.block_tokens, index=i, model_fingerprint=self.runner.fingerprint)[0],
            idx))
        for i, cb in zip(idx, coded):
            refs[i] = BlockRef(content_key(cb.content, self.cold_domain, salt).digest, cb.content)
        status = self.tier.check(tenant, [refs[i] for i in idx]) if idx else []
        for i, cb, st in zip(idx, coded, status):
            if st.state != "present":
                blobs[refs[i].key] = cb.data

    # ---- reading -------------------------------------------------------------------------------------
    def _fetch(self, tenant: str, refs: list[BlockRef]) -> Generator[tuple[int, bytes | None, bool], None, None]:
        """(index, container or None, from Redis) of every ref: host tier hits first, then Redis in pipelined
        round trips: the first block (a core starts decoding after one small round trip), the tail (the
        longest to decode), then the other blocks in order, _FETCH_CHUNK at a time."""
        missing = []
        for i, r in enumerate(refs):
            b = self.host.get(self._key(tenant, r))
            if b is None:
                missing.append(i)
            else:
                yield i, b, False
        missing.sort(key=lambda i: 0.5 if i == len(refs) - 1 else i)  # the first block, the tail, the others
        starts = [0, 1][:len(missing)] + list(range(2, len(missing), _FETCH_CHUNK))
        for lo, hi in zip(starts, starts[1:] + [len(missing)]) if missing else ():
            idx = missing[lo:hi]
            for i, b in zip(idx, self.tier.get_blocks(tenant, [refs[i] for i in idx])):
                if b is not None:
                    self.host.put(self._key(tenant, refs[i]), b)
                yield i, b, True

    def _decode(self, s: Session, i: int, data: bytes):
        """Block i's tensors, or the tail's KVState (i = the last ref), from its stored container."""
        if i < len(s.blocks) - 1:
            return (decode_cold if is_cold(data) else decode_block)(
                data, quant=self.quant, shape=self.shape, block_tokens=self.block_tokens, index=i,
                model_fingerprint=self.runner.fingerprint, content=s.blocks[i].content)
        if _tail_content(data) != s.blocks[-1].content:
            raise ContainerError("stored tail has another content hash than the session recorded")
        return decode_kv(data, model_fingerprint=self.runner.fingerprint)

    def load(self, s: Session) -> Loaded:
        """The cache `save` stored for `s`, bit-identical, and the tier it came from; or why there is none.
        Containers decode on every core (the coder releases the GIL) while the next ones are fetched."""
        if not s.blocks or s.stored_kv_tokens == 0:
            return Loaded(None, reason="missing")
        t0, jobs, tier = time.perf_counter(), [None] * len(s.blocks), Tier.HOST
        try:
            for i, data, remote in self._fetch(s.tenant, s.blocks):
                if data is None:
                    return Loaded(None, reason="missing")
                jobs[i], tier = self._pool.submit(self._decode, s, i, data), Tier.REDIS if remote else tier
        except Exception as e:  # noqa: BLE001 - storage down: recompute
            self.metrics.storage_errors.labels("get_blocks").inc()
            log.warning("could not read KV of %s/%s: %s", s.tenant, s.session_id, e)
            return Loaded(None, reason="missing")
        finally:
            if None in jobs:  # stopped early: drop the decodes not started
                for j in jobs:
                    if j is not None:
                        j.cancel()
        try:
            decoded = [j.result() for j in jobs]
            state = blk.join(decoded[:-1], decoded[-1])
            if state.quant_spec != self.quant.spec() or state.num_tokens != s.stored_kv_tokens:
                raise ContainerError(f"stored KV ({state.quant_spec}, {state.num_tokens} tokens) does not match "
                                     f"({self.quant.spec()}, {s.stored_kv_tokens} tokens)")
            cache = self.runner.restore_cache(state)
        except (ContainerError, ValueError, KeyError) as e:
            for r in s.blocks:  # never serve these bytes from the host tier again
                self.host.discard(self._key(s.tenant, r))
            log.warning("stored KV of %s/%s rejected: %s", s.tenant, s.session_id, e)
            return Loaded(None, reason="corrupt")
        self.cost.observe_load(len(s.blocks), time.perf_counter() - t0)
        return Loaded(cache, tier=tier)

    # ---- prefixes --------------------------------------------------------------------------------------
    def adopt(self, tenant: str, tokens: list[int]) -> Adoption | None:
        """The longest stored canonical prefix of `tokens` worth loading (trie, then Redis), or None."""
        if not self.sharing:
            return None
        points = adoption_points(len(tokens), self.grid, self.chunk)
        if not points:
            return None
        named = self.chain(tenant, tokens[:points[-1]])
        nodes = self.trie.match([h for h, _ in named])
        found = [(n.tensors, n.content, n.public) for n in nodes]
        fetched: list[TrieNode] = []
        if len(found) < len(named):
            rest = named[len(found):]
            try:
                datas = self.tier.get_blocks(tenant, [BlockRef(h.digest, _ZERO, pub) for h, pub in rest])
            except Exception as e:  # noqa: BLE001 - storage down: prefill instead
                self.metrics.storage_errors.labels("get_blocks").inc()
                log.warning("prefix lookup failed: %s", e)
                datas = []
            for j, data in enumerate(datas):
                i = len(found)
                if data is None:
                    break
                try:
                    tensors = decode_block(data, quant=self.quant, shape=self.shape, block_tokens=self.block_tokens,
                                           index=i, model_fingerprint=self.runner.fingerprint)
                    content = bytes.fromhex(block_header(data)["content"])
                except ContainerError as e:
                    log.warning("stored prefix block %d rejected: %s", i, e)
                    break
                found.append((tensors, content, rest[j][1]))
                fetched.append(TrieNode(rest[j][0], named[i - 1][0] if i else None, tensors, content, rest[j][1]))
        usable = [p for p in points if self.grid.count(p) <= len(found)]
        hot = len(nodes)
        cold = self.grid.count(usable[-1]) - hot if usable else 0
        if cold > 0 and not self.cost.load_pays(cold, cold * self.block_tokens):
            usable = [p for p in usable if self.grid.count(p) <= hot]  # prefilling them is cheaper here
        taken = self.grid.count(usable[-1]) if usable else 0
        self.metrics.load_decisions.labels("prefix", "load").inc(taken)
        self.metrics.load_decisions.labels("prefix", "recompute").inc(len(named) - taken)
        for node in fetched:
            self.trie.insert(node)
        if not usable:
            return None
        s = usable[-1]
        nb = self.grid.count(s)
        state = blk.prefix_state([t for t, _, _ in found[:nb]], self.quant, self.shape, self.block_tokens)
        cache = self.runner.restore_cache(state)
        return Adoption(cache, s, min(hot, nb), max(0, nb - hot))

    def hot_tokens(self, tenant: str, tokens: list[int]) -> int:
        """Prompt tokens a new session of `tenant` would adopt from this worker's trie (routing probe)."""
        if not self.sharing or not len(self.trie):
            return 0
        points = adoption_points(len(tokens), self.grid, self.chunk)
        if not points:
            return 0
        held = self.trie.peek([h for h, _ in self.chain(tenant, tokens[:points[-1]])])
        return max((p for p in points if self.grid.count(p) <= held), default=0)

    def register(self, s: Session) -> int:
        """Put the canonical blocks of `s` (its first prefill) into the trie; returns how many were added."""
        if not self.sharing or self.trie.budget_bytes == 0 or s.cache is None:
            return 0
        canon = canonical_tokens(s.schedule, self.chunk)
        named = self.chain(s.tenant, s.tokens[:canon])
        if not named or all(h in self.trie for h, _ in named):
            return 0
        copy = self.runner.restore_cache(s.cache.export_state())
        copy.seal_all()  # the window's canonical blocks, sealed exactly as the session will seal them
        state = copy.export_state()
        parts, _ = blk.split(state, self.block_tokens, min(len(named), blk.whole_blocks(state, self.block_tokens)))
        added = 0
        for i, part in enumerate(parts):
            parent = named[i - 1][0] if i else None
            added += self.trie.insert(TrieNode(named[i][0], parent, part, content_hash(part), named[i][1]))
        return added

    # ---- public prefixes --------------------------------------------------------------------------------
    def refresh_public(self) -> int:
        """Reload the registry of public prefixes (at start and periodically); returns the blocks it names."""
        self.public = {d for digests in self.tier.public_prefixes().values() for d in digests}
        return len(self.public)

    def mark_public(self, tokens: list[int]) -> Generator[None, None, tuple[int, bool]]:
        """Share the canonical prefix of `tokens` with every tenant (yields between prefill passes).

        Its blocks — the complete prefill chunks, computed exactly as a session computes them — are hashed
        with the public salt, stored once in the public scope and registered there, and kept hot here.
        Returns (tokens shared, whether it was newly registered). Raises ValueError when sharing is off or
        `tokens` holds no whole chunk."""
        if not self.sharing:
            raise ValueError("prefix sharing is off (prefix.enabled, or a token-eviction KV spec)")
        points = adoption_points(len(tokens) + 1, self.grid, self.chunk)
        if not points:
            raise ValueError(f"a public prefix needs at least prefix.prefill_chunk={self.chunk} tokens "
                             f"(block-aligned); this one has {len(tokens)}")
        n_tok = points[-1]
        cache, pos = self.runner.new_cache(self.quant), 0
        for n in passes(0, n_tok, self.chunk):
            self.runner.forward(cache, tokens[pos:pos + n])
            pos += n
            yield
        cache.seal_all()
        state = cache.export_state()
        parts, _ = blk.split(state, self.block_tokens, self.grid.count(n_tok))
        hashes = chain(tokens[:n_tok], self.grid, self.domain, self.public_salt)
        refs = [BlockRef(h.digest, content_hash(p), public=True) for h, p in zip(hashes, parts)]
        status = self.tier.check("", refs)
        data = {r.key: encode_block(p, quant=self.quant, shape=self.shape, block_tokens=self.block_tokens, index=i,
                                    model_fingerprint=self.runner.fingerprint).data
                for i, (r, p, st) in enumerate(zip(refs, parts, status)) if st.state != "present"}
        new = self.tier.publish(refs, data)
        self.public |= {r.key for r in refs}
        for i, (h, part, r) in enumerate(zip(hashes, parts, refs)):
            self.trie.insert(TrieNode(h, hashes[i - 1] if i else None, part, r.content, True))
        return n_tok, new
