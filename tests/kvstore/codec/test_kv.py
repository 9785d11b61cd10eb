import numpy as np
import pytest
import torch

from kvstore.codec.container import Codec, ContainerError, Kind, pack_container, unpack_container
from kvstore.codec.kv import decode_kv, encode_kv
from kvstore.config import QuantConfig
from kvstore.quant.cache import QuantizedKVCache

FP = "f" * 64


def _state(spec="int4:k8v4:g32:gv16:r32", n=150, dtype=torch.float32):
    cache = QuantizedKVCache(QuantConfig.parse(spec), 3)
    g = torch.Generator().manual_seed(0)
    for layer in range(3):
        cache.update(torch.randn(1, 2, n, 16, generator=g).to(dtype), torch.randn(1, 2, n, 16, generator=g).to(dtype), layer)
    return cache.export_state()


@pytest.mark.parametrize("spec,dtype", [("int4:k8v4:g32:gv16:r32", torch.float32), ("int2:g32:gv16:r0", torch.bfloat16),
                                        ("fp", torch.float16), ("int3:g32:gv16:r100", torch.float32)])
def test_roundtrip_is_bit_exact(spec, dtype):
    s = _state(spec, dtype=dtype)
    back = decode_kv(encode_kv(s, model_fingerprint=FP), model_fingerprint=FP)
    assert back.equals(s)
    cache = QuantizedKVCache.from_state(back)
    assert cache.export_state().equals(s)


def test_overhead_is_bounded_even_for_incompressible_codes():
    s = _state("int4:g32:gv16:r0", n=512)  # random codes: zstd cannot shrink them, and must not blow them up
    blob = encode_kv(s, model_fingerprint=FP)
    header = len(blob) - len(unpack_container(blob)[3])
    assert len(blob) - header <= s.nbytes * 1.01 + 1024


def test_wrong_model_is_refused():
    blob = encode_kv(_state(), model_fingerprint=FP)
    with pytest.raises(ContainerError, match="made by model"):
        decode_kv(blob, model_fingerprint="0" * 64)


def test_corruption_and_truncation_are_refused():
    blob = encode_kv(_state(), model_fingerprint=FP)
    for bad in (blob[:-3], blob[: len(blob) // 2], blob[:10]):
        with pytest.raises(ContainerError, match="truncated"):
            decode_kv(bad)
    flipped = bytearray(blob)
    flipped[-20] ^= 0x10
    with pytest.raises(ContainerError, match="checksum"):
        decode_kv(bytes(flipped))


def _repack(blob, **meta_changes):
    kind, codec, meta, payload = unpack_container(blob)
    meta.update(meta_changes)
    return pack_container(kind, codec, meta, payload)


def test_consistent_but_lying_headers_are_refused():
    blob = encode_kv(_state(), model_fingerprint=FP)
    with pytest.raises(ContainerError, match="decompressed to"):
        decode_kv(_repack(blob, raw_bytes=10))
    with pytest.raises(ContainerError, match="over the"):
        decode_kv(_repack(blob, raw_bytes=1 << 40))
    with pytest.raises(ContainerError, match="shapes"):
        decode_kv(_repack(blob, shapes={}))
    with pytest.raises(ContainerError, match="missing or has a bad field"):
        decode_kv(pack_container(Kind.KV, Codec.ZSTD, {}, b""))
    with pytest.raises(ContainerError, match="does not decompress"):
        kind, codec, meta, _ = unpack_container(blob)
        decode_kv(pack_container(kind, codec, meta, b"not zstd at all"))
    with pytest.raises(ContainerError, match="expected a KV object"):
        decode_kv(pack_container(Kind.MANIFEST, Codec.RAW, {}, b""))
    assert np is not None
