import numpy as np
import pytest
import torch
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from kvstore.codec.container import Codec, ContainerError, Kind, pack_container, unpack_container
from kvstore.codec.kv import decode_kv, encode_kv
from kvstore.config import QuantConfig
from kvstore.quant.cache import QuantizedKVCache
from kvstore.quant.state import KVState

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


# ---- every dtype, raw codec, lying payloads ------------------------------------------------------


DTYPES = [np.uint8, np.int8, np.uint16, np.int16, np.uint32, np.int32, np.uint64, np.int64, np.float16, np.float32,
          np.float64, np.bool_]


def _random_state() -> KVState:
    rng = np.random.default_rng(7)
    # Random bit patterns (NaNs with payloads, -0.0, subnormals...) for every dtype but bool.
    tensors = [(f"t.{np.dtype(dt).name}", np.frombuffer(rng.bytes(30 * np.dtype(dt).itemsize), dtype=dt)
                .reshape(2, 3, 5).copy())
               for dt in DTYPES if dt is not np.bool_]
    tensors.append(("t.bool", rng.integers(0, 2, size=(4, 4)).astype(np.bool_)))
    tensors.append(("empty", np.zeros((3, 0), dtype=np.float16)))
    tensors.append(("scalar", np.array(3.5, dtype=np.float32)))
    return KVState(num_tokens=42, quant_spec="int:k4v2:g64:gv32:r128",
                   meta={"layers": 2, "layer_dtypes": ["torch.bfloat16"], "nested": {"a": [1, 2.5, None, "x"]}},
                   tensors=tensors)


def test_every_dtype_roundtrips_bit_exact():
    s = _random_state()
    blob = encode_kv(s, model_fingerprint=FP, level=1)
    back = decode_kv(blob, model_fingerprint=FP)
    assert back.equals(s)
    assert [n for n, _ in back.tensors] == [n for n, _ in s.tensors]
    assert all(a.flags.writeable and a.flags.c_contiguous for _, a in back.tensors)
    _, codec, meta, _ = unpack_container(blob)
    assert codec is Codec.ZSTD_STREAMS and meta["model_fingerprint"] == FP and meta["meta"] == s.meta
    assert meta["shapes"]["t.float16"] == ["float16", [2, 3, 5]]


@settings(max_examples=40, deadline=None)
@given(arrays=st.lists(hnp.arrays(st.sampled_from(DTYPES), hnp.array_shapes(min_dims=1, max_dims=3, min_side=0,
                                                                             max_side=6)), max_size=4),
       n=st.integers(0, 2**40), level=st.integers(1, 5))
def test_roundtrip_property(arrays, n, level):
    s = KVState(num_tokens=n, quant_spec="fp", meta={"n": n}, tensors=[(f"x{i}", a) for i, a in enumerate(arrays)])
    assert decode_kv(encode_kv(s, model_fingerprint=FP, level=level)).equals(s)


def test_raw_codec_is_read_too():
    s = _random_state()
    _, _, meta, payload = unpack_container(encode_kv(s, model_fingerprint=FP, codec=Codec.ZSTD))
    raw = zstandard.ZstdDecompressor().decompress(payload)
    assert decode_kv(pack_container(Kind.KV, Codec.RAW, meta, raw)).equals(s)
    assert decode_kv(encode_kv(s, model_fingerprint=FP, codec=Codec.ZSTD)).equals(s)  # older containers
    with pytest.raises(ContainerError, match="raw_bytes"):
        decode_kv(pack_container(Kind.KV, Codec.RAW, meta, raw + b"\x00"))


def test_lying_payloads_are_refused():
    s = _random_state()
    kind, codec, meta, payload = unpack_container(encode_kv(s, model_fingerprint=FP))
    with pytest.raises(ContainerError, match="trailing bytes after its zstd frame"):
        decode_kv(pack_container(kind, codec, meta, payload + b"junk"))
    raw = zstandard.ZstdDecompressor().decompress(payload)
    no_size = zstandard.ZstdCompressor(write_content_size=False).compress(raw)
    with pytest.raises(ContainerError, match="does not declare its content size"):
        decode_kv(pack_container(kind, codec, meta, no_size))
    with pytest.raises(ContainerError, match="truncated"):
        decode_kv(pack_container(kind, codec, meta, payload[:-4]))
    other = KVState(num_tokens=1, quant_spec="fp", tensors=[("t.uint8", np.zeros(30, np.int8))])
    _, _, _, other_payload = unpack_container(encode_kv(other, model_fingerprint=FP))
    with pytest.raises(ContainerError, match="shapes in the header"):
        decode_kv(pack_container(kind, codec, {**meta, "raw_bytes": len(zstandard.ZstdDecompressor().decompress(
            other_payload))}, other_payload))


@pytest.mark.parametrize("change", [{"meta": "x"}, {"num_tokens": -1}, {"num_tokens": True}, {"quant_spec": 4},
                                    {"raw_bytes": -5}, {"shapes": []}])
def test_bad_header_fields_are_refused(change):
    kind, codec, meta, payload = unpack_container(encode_kv(_random_state(), model_fingerprint=FP))
    with pytest.raises(ContainerError, match="missing or has a bad field"):
        decode_kv(pack_container(kind, codec, {**meta, **change}, payload))


def test_fingerprint_is_checked_only_when_asked():
    blob = encode_kv(_random_state(), model_fingerprint=FP)
    assert decode_kv(blob).equals(_random_state())
    with pytest.raises(ContainerError, match="fingerprint mismatch"):
        decode_kv(blob, model_fingerprint="other")


def test_unencodable_states_are_refused():
    with pytest.raises(ContainerError, match="unsupported dtype"):
        encode_kv(KVState(1, "fp", tensors=[("c", np.zeros(2, np.complex64))]), model_fingerprint=FP)
    with pytest.raises(ContainerError, match="not JSON-serializable"):
        encode_kv(KVState(1, "fp", meta={"o": object()}), model_fingerprint=FP)
