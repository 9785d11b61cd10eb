import numpy as np
import pytest
import torch

from kvstore.codec import streams
from kvstore.codec.container import Codec, unpack_container
from kvstore.codec.kv import decode_kv, encode_kv
from kvstore.config import QuantConfig
from kvstore.quant.cache import QuantizedKVCache

FP = "f" * 64


def _state(spec, n=150, dtype=torch.float32, layers=2):
    cache = QuantizedKVCache(QuantConfig.parse(spec), layers)
    g = torch.Generator().manual_seed(1)
    for layer in range(layers):
        k = torch.randn(1, 2, n, 16, generator=g).cumsum(-2).to(dtype)  # smooth in time, like real keys
        cache.update(k, torch.randn(1, 2, n, 16, generator=g).to(dtype), layer)
    return cache.export_state()


@pytest.mark.parametrize("spec,dtype", [
    ("int4:g32:gv16:r16", torch.float32), ("int3:g32:gv16:r0:s3", torch.bfloat16), ("int2:g12:gv8:r5", torch.float16),
    ("int8:g32:gv16:r0:out0.02", torch.float32), ("int4:lb2f42:g16:gv16:r4", torch.float32),
    ("int:k16v16:g16:r8:ev0.25", torch.float32), ("fp", torch.float32),
])
def test_streams_roundtrip_bit_exact(spec, dtype):
    s = _state(spec, dtype=dtype)
    ctx = streams.StreamContext.of(s.quant_spec, {n: a.shape for n, a in s.tensors})
    for name, arr in s.tensors:
        data = streams.forward(name, arr, ctx)
        assert data.dtype == np.uint8 and data.ndim == 1 and data.nbytes == arr.nbytes
        back = streams.inverse(name, data, arr.dtype, arr.shape, ctx)
        assert back.dtype == arr.dtype and back.shape == arr.shape and back.tobytes() == arr.tobytes()
    blob = encode_kv(s, model_fingerprint=FP)
    assert unpack_container(blob)[1] is Codec.ZSTD_STREAMS
    assert decode_kv(blob, model_fingerprint=FP).equals(s)


def test_key_codes_really_go_channel_major():
    s = _state("int4:g32:gv16:r0", n=64, layers=1)
    ctx = streams.StreamContext.of(s.quant_spec, {n: a.shape for n, a in s.tensors})
    arr = s.tensor_dict()["0.k_codes"]  # [1, 2, 64, 8] packed along head_dim
    data = streams.forward("0.k_codes", arr, ctx).reshape(1, 2, 16, 32)  # [B, H, D, packed(T)]
    lo = arr[0, 0, :, 0] & 15  # channel 0 of head 0 over the 64 tokens
    assert np.array_equal(data[0, 0, 0, :] & 15, lo[0::2]) and np.array_equal(data[0, 0, 0, :] >> 4, lo[1::2])


def test_mismatched_header_is_a_container_error():
    from kvstore.codec.container import ContainerError, pack_container

    s = _state("int4:g32:gv16:r16")
    kind, codec, meta, payload = unpack_container(encode_kv(s, model_fingerprint=FP))
    meta = {**meta, "shapes": {**meta["shapes"], "0.k_codes": ["uint8", [1, 2, 999, 8]]}}
    with pytest.raises(ContainerError, match="shapes"):
        decode_kv(pack_container(kind, codec, meta, payload))


@pytest.mark.parametrize("spec", ["int4:g32:gv16:r16", "int2:g16:gv8:r0:out0.02", "int3:g32:gv16:r8:s3"])
def test_a_tail_without_sealed_tokens_round_trips(spec):
    """Cutting every whole block out of a state leaves empty sealed tensors in its tail (kvstore.prefix.blocks)."""
    from kvstore.prefix.blocks import split, whole_blocks

    s = _state(spec)
    block = QuantConfig.parse(spec).key_group
    _, tail = split(s, block, whole_blocks(s, block))
    assert any(a.size == 0 for n, a in tail.tensors if n.endswith("k_codes"))
    assert decode_kv(encode_kv(tail, model_fingerprint=FP), model_fingerprint=FP).equals(tail)
