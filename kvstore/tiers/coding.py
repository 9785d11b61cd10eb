"""`BlockCoder`: encodes and decodes one model's stored blocks and tails on a pool of threads.

A session's stored KV is content blocks (coded by a codec of `kvstore.codec.registry`: the default
lossless one, or the cold one in cold mode) plus one tail (kvstore.codec.kv). The coder binds them to the
model's identity (`BlockContext`: fingerprint, shape, spec, block size), so a container for another model or
configuration is rejected when decoded; any registered codec's blocks decode.

Invariants:
- `decode(e.data, i)` gives back `e.tensors` bit for bit for `e` in `encode_many(...)` (the cold codec's:
  the warm tensors of the cold copy, the same every time).
- A tail's content id is a hash of its container header, which holds the checksum of everything else
  (`decode_kv` verifies it), so a tail's megabytes are hashed once, not twice, on a resume.
- The coders release the GIL: `pool` jobs run on every core. Their torch ops open no OpenMP team
  (kvstore/openmp.py): the pool never slows the model's passes on the engine thread.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

from kvstore.codec import rans
from kvstore.codec.block_codec import BlockContext, EncodedBlock
from kvstore.codec.container import ContainerError, container_header
from kvstore.codec.kv import decode_kv, encode_kv
from kvstore.codec.registry import DEFAULT, BlockDecoder, codec_named
from kvstore.config import QuantConfig
from kvstore.digest import hash_fields
from kvstore.openmp import serial_torch
from kvstore.prefix import blocks as blk
from kvstore.prefix.blocks import ModelShape, Tensors
from kvstore.quant.cache import QuantizedKVCache
from kvstore.quant.state import KVState
from kvstore.tiers.store_types import ModelIdentity, StoreSettings


def tail_content(blob: bytes) -> bytes:
    """A tail's content id: the hash of its container header (which checksums the rest)."""
    return hash_fields([container_header(blob)], person=b"kvstash-tail")


class BlockCoder:
    def __init__(self, model: ModelIdentity, settings: StoreSettings):
        self.model, self.quant, self.shape = model, model.quant, model.shape
        self.block_tokens, self.level = settings.block_tokens, settings.codec_level
        self.ctx = BlockContext(self.quant, self.shape, self.block_tokens, model.fingerprint, model.key_exps)
        self.warm = codec_named(DEFAULT)(self.ctx)
        self.cold = codec_named("cold")(self.ctx, settings.cold.spec()) if settings.cold is not None else None
        self.decoder = BlockDecoder(self.ctx)
        self.pool = ThreadPoolExecutor(settings.codec_threads or os.cpu_count() or 1, thread_name_prefix="kvcodec",
                                       initializer=serial_torch)

    # ---- encoding ----------------------------------------------------------------------------------
    def encode_many(self, parts: list[Tensors], idx: list[int], cold: bool = False) -> list[EncodedBlock]:
        """Blocks `idx` of `parts` encoded on the pool, in order (`cold`: with the cold codec)."""
        codec = self.cold if cold else self.warm
        if codec is None:
            raise ValueError("this store has no cold codec (tiers.cold_spec is not set)")
        return list(self.pool.map(lambda i: codec.encode(parts[i], i), idx))

    def encode_tail(self, tail: KVState) -> bytes:
        return encode_kv(tail, model_fingerprint=self.model.fingerprint, level=self.level)

    # ---- decoding ----------------------------------------------------------------------------------
    def decode(self, data: bytes, index: int, content: bytes | None = None) -> Tensors:
        """Block `index`'s tensors (warm or cold container); ContainerError when it is not the block
        expected (checksum, identity, layout, and `content` when given)."""
        return self.decoder.decode(data, index, content)

    def decode_tail(self, data: bytes, content: bytes) -> KVState:
        if tail_content(data) != content:
            raise ContainerError("stored tail has another content hash than the session recorded")
        return decode_kv(data, model_fingerprint=self.model.fingerprint)

    def submit_decode(self, data: bytes, index: int, contents: list[bytes]) -> Future:
        """Decode ref `index` of a session's refs (blocks, then the tail, whose content is `contents[-1]`)
        on the pool."""
        if index < len(contents) - 1:
            return self.pool.submit(self.decode, data, index, contents[index])
        return self.pool.submit(self.decode_tail, data, contents[-1])

    # ---- start-up ------------------------------------------------------------------------------------
    def warm_up(self, new_cache: Callable[[], QuantizedKVCache] | None = None) -> None:
        """Code a small random session once (2 blocks and a tail, through every codec in use), so the coder's
        kernels are compiled or loaded from numba's cache now: on a first offload or resume that time would
        be taken for the cost of restoring (`RestoreCost`) and steer resumes to recomputation. `new_cache`
        makes the model's empty cache (needed for specs that seal keys before RoPE)."""
        rans.warm_up()  # the vector kernel too, which small sessions' streams do not reach
        state = random_state(self.quant, self.shape, 2 * self.block_tokens + self.quant.residual + self.quant.key_group,
                             new_cache=new_cache)
        parts, tail = blk.split(state, self.block_tokens, blk.whole_blocks(state, self.block_tokens))
        for codec in (self.warm, self.cold) if self.cold is not None else (self.warm,):
            for i, p in enumerate(parts):
                self.decoder.decode(codec.encode(p, i).data, i)
        decode_kv(encode_kv(tail, model_fingerprint="warm-up", level=self.level))

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)


def random_state(quant: QuantConfig, shape: ModelShape, tokens: int, seed: int = 0,
                 new_cache: Callable[[], QuantizedKVCache] | None = None) -> KVState:
    """The exported state of a cache of `shape` (made by `new_cache`, by default one without RoPE) fed
    `tokens` random keys and values after the sinks, in one pass."""
    import torch

    cache = new_cache() if new_cache is not None else QuantizedKVCache(quant, shape.layers)
    g = torch.Generator().manual_seed(seed)
    dtype = getattr(torch, shape.dtype.removeprefix("torch."))
    n = quant.sinks + tokens
    for layer in range(shape.layers):
        k, v = (torch.randn(1, shape.kv_heads, n, shape.head_dim, generator=g).to(dtype) for _ in "kv")
        cache.update(k, v, layer)
    return cache.export_state()
