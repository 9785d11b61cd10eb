"""`SessionStore`: the storage engine of sessions' KV — blocks in a warm host tier and Redis, and a hot
prefix trie — for one model.

It cuts a session's exported KV (`KVState`) into content blocks plus a tail and back (kvstore.prefix.blocks),
names each block (`BlockNamer`: a chain hash for canonical blocks, so other sessions with the same prompt
find and share it; a content key otherwise), codes them on a pool (`BlockCoder`), writes only the blocks
Redis does not hold yet and commits the session's manifest with them (`RedisTier.commit_session`), and finds
stored prefixes a new session can adopt instead of prefilling. It needs no model: the caller turns states
into device caches. It reports what it measures as typed events (kvstore/tiers/store_types.py).

Invariants:
- A block is shared only when its stored content hash equals this session's (`RedisTier` refuses
  conflicts; the store then files the block under its content key instead), so `restore` returns exactly
  the state `save` was given, bit for bit.
- Tenants never share private blocks (see kvstore/tiers/naming.py); public prefixes are shared by all.
- `restore` and `adopt` never raise for bad or missing stored data: they say so (`Restored.reason`, None),
  and the caller recomputes from the token history. A rejected block is dropped from the host tier.
- A failed `save` leaves the previous manifest in force (nothing half-done is referenced).
- Cold mode (`StoreSettings.cold`, lossy, opt-in): a session's blocks that Redis does not hold yet, public
  ones excepted, are stored in the cold format under content keys of their *warm* content, and `restore`
  returns the warm state: exact with respect to what was stored, not to the session's original codes.
  The tail is stored as `ColdCodec.warm_tail` keeps it (sinks at bf16, window codes at the spec's `cw`
  bits), losslessly; that step is idempotent, so storing a resumed session again changes nothing more.
  Blocks held cold and unchanged keep their cold copy, so offloading again never re-quantizes twice.
  Chain-named (adoptable) blocks stay lossless.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Generator

from kvstore.codec.block_codec import content_hash
from kvstore.codec.container import ContainerError
from kvstore.prefix import blocks as blk
from kvstore.prefix.canonical import adoption_points
from kvstore.prefix.trie import PrefixTrie, TrieNode
from kvstore.quant.state import KVState
from kvstore.schedule import canonical_tokens
from kvstore.tiers.coding import BlockCoder, tail_content
from kvstore.tiers.host_tier import HostTier
from kvstore.tiers.manifest import BlockRef, SessionManifest
from kvstore.tiers.naming import BlockNamer
from kvstore.tiers.policy import RestoreCost
from kvstore.tiers.redis_tier import BlockRefused, RedisTier, StaleManifest
from kvstore.tiers.store_types import (
    CORRUPT,
    MISSING,
    Adoption,
    BytesWritten,
    CompressionMeasured,
    ModelIdentity,
    Published,
    Restored,
    RestoreDecided,
    Saved,
    StorageFailed,
    StoreEvents,
    StoreSettings,
    ignore_events,
)

log = logging.getLogger(__name__)
_ZERO = bytes(32)
FETCH_CHUNK = 2  # blocks per Redis round trip on a resume (decoding overlaps the next round trip)


class SessionStore:
    def __init__(self, tier: RedisTier, model: ModelIdentity, settings: StoreSettings,
                 events: StoreEvents = ignore_events):
        self.tier, self.model, self.settings, self.events = tier, model, settings, events
        self.quant, self.shape = model.quant, model.shape
        self.block_tokens, self.chunk = settings.block_tokens, settings.prefill_chunk
        self.sharing = settings.sharing and not self.quant.evict
        self.names = BlockNamer(model, settings)
        self.grid = self.names.grid
        self.coder = BlockCoder(model, settings)
        self.trie = PrefixTrie(settings.trie_bytes if self.sharing else 0)
        self.host = HostTier(settings.host_bytes)
        self.cost = RestoreCost()

    def _key(self, tenant: str, ref: BlockRef) -> str:
        return self.tier.block_key(tenant, ref)

    def _split(self, state: KVState, n: int | None = None):
        return blk.split(state, self.block_tokens, blk.whole_blocks(state, self.block_tokens) if n is None else n)

    # ---- writing -------------------------------------------------------------------------------------
    def save(self, manifest: SessionManifest, state: KVState, held: list[BlockRef],
             manifest_sha: str | None) -> Saved:
        """Store `state` (the KV of `manifest.tokens` built by `manifest.schedule`) as blocks + tail and commit
        `manifest` listing them, replacing the record tagged `manifest_sha` (None: any) whose blocks are
        `held`. Raises on storage failure."""
        tenant, sid = manifest.tenant, manifest.session_id
        n = blk.whole_blocks(state, self.block_tokens)
        parts, tail = self._split(state, n)
        canon = canonical_tokens(manifest.schedule, self.chunk) if self.sharing else 0
        named = self.names.chain(tenant, manifest.tokens[:canon])[:n]
        contents = [content_hash(p) for p in parts]
        refs = [BlockRef(named[i][0].digest, c, named[i][1]) if i < len(named)
                else self.names.by_content(tenant, c) for i, c in enumerate(contents)]
        if self.coder.cold is not None:  # stored (and so resumed) as cold mode keeps a tail: idempotent
            tail = self.coder.cold.warm_tail(tail)
        tail_blob = self.coder.encode_tail(tail)
        if self.settings.cold is not None:  # blocks held cold and unchanged since (a resumed session) keep their copy
            for i, prev in enumerate(held[:min(n, len(held) - 1)]):
                if prev.content == contents[i]:
                    refs[i] = prev
        refs.append(self.names.by_content(tenant, tail_content(tail_blob)))
        blobs: dict[bytes, bytes] = {refs[-1].key: tail_blob}
        for _ in range(3):
            held_now = set(held)
            todo = [i for i, r in enumerate(refs) if r not in held_now and r.key not in blobs]
            status = dict(zip(todo, self.tier.check(tenant, [refs[i] for i in todo]))) if todo else {}
            clashes = [i for i in todo if status[i].state == "conflict"]
            for i in clashes:  # same tokens, other bits (another kernel's rounding): keep a copy of our own
                refs[i] = self.names.by_content(tenant, refs[i].content)
            if clashes:
                status.update(zip(clashes, self.tier.check(tenant, [refs[i] for i in clashes])))
            absent = [i for i in todo if status[i].state == "absent" and refs[i].key not in blobs]
            if self.settings.cold is not None:  # the session's own blocks go cold; public ones stay lossless
                self._store_cold(tenant, parts, refs, [i for i in absent if not refs[i].public], blobs)
                absent = [i for i in absent if refs[i].public]
            for i, enc in zip(absent, self.coder.encode_many(parts, absent)):
                blobs[refs[i].key] = enc.data
            m = dataclasses.replace(manifest, blocks=list(refs), kv_tokens=state.num_tokens)
            try:
                done = self.tier.commit_session(m, held, blobs, expect_sha=manifest_sha or "*")
            except BlockRefused as e:  # a block vanished or appeared meanwhile: look again
                log.info("offload of %s/%s raced another writer (%s); retrying", tenant, sid, e)
                for r in e.missing + e.conflicts:
                    blobs.pop(r.key, None)
                continue
            except StaleManifest:  # another writer's record: ours replaces it and releases its blocks
                record = self.tier.get_record(tenant, sid)
                log.warning("manifest of %s/%s was rewritten by another writer; this worker's copy wins", tenant, sid)
                held, manifest_sha = (record[0].blocks, record[1]) if record else ([], None)
                continue
            for r in refs:
                if r.key in blobs:
                    self.host.put(self._key(tenant, r), blobs[r.key])
            self.events(BytesWritten(sum(len(b) for b in blobs.values())))
            stored = sum(x.size for x in self.tier.check(tenant, refs))
            self._report_compression(state, stored)
            return Saved(refs, state.num_tokens, done.sha1, done.bytes + stored)
        raise RuntimeError(f"offload of {tenant}/{sid} kept racing other writers")

    def _report_compression(self, state: KVState, stored: int) -> None:
        raw, sh = state.nbytes, self.shape
        fp16 = 2 * 2 * state.num_tokens * sh.layers * sh.kv_heads * sh.head_dim
        if stored and raw:
            self.events(CompressionMeasured(quantization=fp16 / raw, codec=raw / stored, total=fp16 / stored))

    def _store_cold(self, tenant: str, parts, refs: list[BlockRef], idx: list[int], blobs: dict) -> None:
        """Cold-encode blocks `idx`: their refs become content keys of the warm content, and blobs are added
        for the ones Redis does not hold yet."""
        coded = self.coder.encode_many(parts, idx, cold=True)
        for i, cb in zip(idx, coded):
            refs[i] = self.names.cold_by_content(tenant, cb.content)
        status = self.tier.check(tenant, [refs[i] for i in idx]) if idx else []
        for i, cb, st in zip(idx, coded, status):
            if st.state != "present":
                blobs[refs[i].key] = cb.data

    def delete(self, tenant: str, session_id: str) -> bool:
        """Remove the session's record and release its blocks' references (a block goes with its last one);
        True if it existed. Raises on storage failure."""
        m = None
        try:
            m = self.tier.get_manifest(tenant, session_id)
        except ContainerError:
            pass
        for r in m.blocks if m is not None else []:
            self.host.discard(self._key(tenant, r))
        return self.tier.delete_session(tenant, session_id)

    # ---- reading -------------------------------------------------------------------------------------
    def _fetch(self, tenant: str, refs: list[BlockRef]) -> Generator[tuple[int, bytes | None, bool], None, None]:
        """(index, container or None, from Redis) of every ref: host tier hits first, then Redis in pipelined
        round trips: the first block (a core starts decoding after one small round trip), the tail (the
        longest to decode), then the other blocks in order, FETCH_CHUNK at a time."""
        missing = []
        for i, r in enumerate(refs):
            b = self.host.get(self._key(tenant, r))
            if b is None:
                missing.append(i)
            else:
                yield i, b, False
        missing.sort(key=lambda i: 0.5 if i == len(refs) - 1 else i)  # the first block, the tail, the others
        starts = [0, 1][:len(missing)] + list(range(2, len(missing), FETCH_CHUNK))
        for lo, hi in zip(starts, starts[1:] + [len(missing)]) if missing else ():
            idx = missing[lo:hi]
            for i, b in zip(idx, self.tier.get_blocks(tenant, [refs[i] for i in idx])):
                if b is not None:
                    self.host.put(self._key(tenant, refs[i]), b)
                yield i, b, True

    def restore(self, tenant: str, blocks: list[BlockRef], kv_tokens: int) -> Restored:
        """The state `save` stored as `blocks` (covering `kv_tokens` tokens), bit-identical, and the tier it
        came from; or why there is none. Containers decode on every core while the next ones are fetched."""
        if not blocks or kv_tokens == 0:
            return Restored(None, reason=MISSING)
        t0, jobs, tier, contents = time.perf_counter(), [None] * len(blocks), "host", [r.content for r in blocks]
        try:
            for i, data, remote in self._fetch(tenant, blocks):
                if data is None:
                    return Restored(None, reason=MISSING)
                jobs[i], tier = self.coder.submit_decode(data, i, contents), "redis" if remote else tier
        except Exception as e:  # noqa: BLE001 - storage down: recompute
            self.events(StorageFailed("get_blocks"))
            log.warning("could not read stored KV of %s: %s", tenant, e)
            return Restored(None, reason=MISSING)
        finally:
            if None in jobs:  # stopped early: drop the decodes not started
                for j in jobs:
                    if j is not None:
                        j.cancel()
        try:
            decoded = [j.result() for j in jobs]
            state = blk.join(decoded[:-1], decoded[-1])
            if state.quant_spec != self.quant.spec() or state.num_tokens != kv_tokens:
                raise ContainerError(f"stored KV ({state.quant_spec}, {state.num_tokens} tokens) does not match "
                                     f"({self.quant.spec()}, {kv_tokens} tokens)")
        except (ContainerError, ValueError, KeyError) as e:
            for r in blocks:  # never serve these bytes from the host tier again
                self.host.discard(self._key(tenant, r))
            log.warning("stored KV of %s rejected: %s", tenant, e)
            return Restored(None, reason=CORRUPT)
        self.cost.observe_restore(len(blocks), time.perf_counter() - t0)
        return Restored(state, tier=tier)

    # ---- prefixes --------------------------------------------------------------------------------------
    def adopt(self, tenant: str, tokens: list[int]) -> Adoption | None:
        """The longest stored canonical prefix of `tokens` worth restoring (trie, then Redis), or None."""
        if not self.sharing:
            return None
        points = adoption_points(len(tokens), self.grid, self.chunk)
        if not points:
            return None
        named = self.names.chain(tenant, tokens[:points[-1]])
        nodes = self.trie.match([h for h, _ in named])
        found = [(n.tensors, n.content, n.public) for n in nodes]
        fetched: list[TrieNode] = []
        if len(found) < len(named):
            rest = named[len(found):]
            try:
                datas = self.tier.get_blocks(tenant, [BlockRef(h.digest, _ZERO, pub) for h, pub in rest])
            except Exception as e:  # noqa: BLE001 - storage down: prefill instead
                self.events(StorageFailed("get_blocks"))
                log.warning("prefix lookup failed: %s", e)
                datas = []
            for j, data in enumerate(datas):
                i = len(found)
                if data is None:
                    break
                try:
                    tensors = self.coder.decode(data, i)
                    content = content_hash(tensors)
                except ContainerError as e:
                    log.warning("stored prefix block %d rejected: %s", i, e)
                    break
                found.append((tensors, content, rest[j][1]))
                fetched.append(TrieNode(rest[j][0], named[i - 1][0] if i else None, tensors, content, rest[j][1]))
        usable = [p for p in points if self.grid.count(p) <= len(found)]
        hot = len(nodes)
        cold = self.grid.count(usable[-1]) - hot if usable else 0
        if cold > 0 and not self.cost.restore_pays(cold, cold * self.block_tokens):
            usable = [p for p in usable if self.grid.count(p) <= hot]  # prefilling them is cheaper here
        taken = self.grid.count(usable[-1]) if usable else 0
        self.events(RestoreDecided("prefix", "load", taken))
        self.events(RestoreDecided("prefix", "recompute", len(named) - taken))
        for node in fetched:
            self.trie.insert(node)
        if not usable:
            return None
        nb = self.grid.count(usable[-1])
        state = blk.prefix_state([t for t, _, _ in found[:nb]], self.quant, self.shape, self.block_tokens)
        return Adoption(state, usable[-1], min(hot, nb), max(0, nb - hot))

    def hot_tokens(self, tenant: str, tokens: list[int]) -> int:
        """Prompt tokens a new session of `tenant` would adopt from the trie (routing probe)."""
        if not self.sharing or not len(self.trie):
            return 0
        points = adoption_points(len(tokens), self.grid, self.chunk)
        if not points:
            return 0
        held = self.trie.peek([h for h, _ in self.names.chain(tenant, tokens[:points[-1]])])
        return max((p for p in points if self.grid.count(p) <= held), default=0)

    def register_prefix(self, tenant: str, tokens: list[int], schedule: list[int],
                        sealed_state: Callable[[], KVState]) -> int:
        """Put the canonical blocks of a session (its first prefill) into the trie; returns how many were
        added. `sealed_state` gives the session's state with every whole window group sealed exactly as the
        session will seal it (called only when some block is not hot yet)."""
        if not self.sharing or self.trie.budget_bytes == 0:
            return 0
        named = self.names.chain(tenant, tokens[:canonical_tokens(schedule, self.chunk)])
        if not named or all(h in self.trie for h, _ in named):
            return 0
        state = sealed_state()
        parts, _ = self._split(state, min(len(named), blk.whole_blocks(state, self.block_tokens)))
        added = 0
        for i, part in enumerate(parts):
            parent = named[i - 1][0] if i else None
            added += self.trie.insert(TrieNode(named[i][0], parent, part, content_hash(part), named[i][1]))
        return added

    # ---- public prefixes --------------------------------------------------------------------------------
    def refresh_public(self) -> int:
        """Reload the registry of public prefixes (at start and periodically); returns the blocks it names."""
        self.names.public = {d for digests in self.tier.public_prefixes().values() for d in digests}
        return len(self.names.public)

    def public_tokens(self, n_tokens: int) -> int:
        """How many of a would-be public prefix's `n_tokens` tokens can be shared (its whole prefill chunks,
        block-aligned). Raises ValueError when sharing is off or there is no whole chunk."""
        if not self.sharing:
            raise ValueError("prefix sharing is off (prefix.enabled, or a token-eviction KV spec)")
        points = adoption_points(n_tokens + 1, self.grid, self.chunk)
        if not points:
            raise ValueError(f"a public prefix needs at least prefix.prefill_chunk={self.chunk} tokens "
                             f"(block-aligned); this one has {n_tokens}")
        return points[-1]

    def publish(self, tokens: list[int], sealed: KVState) -> Published:
        """Share `tokens` (`public_tokens` of them) with every tenant: `sealed` is their KV computed exactly
        as a session computes it (canonical passes) and then sealed whole. Its blocks are hashed with the
        public salt, stored once in the public scope, registered there, and kept hot in the trie."""
        n_tok = self.public_tokens(len(tokens))
        if len(tokens) != n_tok or sealed.num_tokens != n_tok:
            raise ValueError(f"publish takes exactly the {n_tok} shareable tokens and their state")
        parts, _ = self._split(sealed, self.grid.count(n_tok))
        hashes = self.names.public_chain(tokens)
        refs = [BlockRef(h.digest, content_hash(p), public=True) for h, p in zip(hashes, parts)]
        status = self.tier.check("", refs)
        todo = [i for i, st in enumerate(status) if st.state != "present"]
        data = {refs[i].key: enc.data for i, enc in zip(todo, self.coder.encode_many(parts, todo))}
        new = self.tier.publish(refs, data)
        self.names.public |= {r.key for r in refs}
        for i, (h, part, r) in enumerate(zip(hashes, parts, refs)):
            self.trie.insert(TrieNode(h, hashes[i - 1] if i else None, part, r.content, True))
        return Published(n_tok, new)

    def close(self) -> None:
        self.coder.close()
