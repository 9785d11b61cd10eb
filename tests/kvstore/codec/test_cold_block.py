"""Cold blocks (kvstore/codec/cold_block.py): blockwise cold equals region-wide cold bit for bit, the stored
container decodes to exactly the warm block it promised, and tampering or a foreign block is refused."""

import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from kvstore.codec.block import RansCtxCodec
from kvstore.codec.block_codec import BlockContext, content_hash
from kvstore.codec.cold_block import VALUES, ColdCodec, check_cold
from kvstore.codec.container import ContainerError
from kvstore.config import QuantConfig
from kvstore.layout import ModelShape
from kvstore.prefix import blocks as blk
from kvstore.quant.cache import QuantizedKVCache
from kvstore.quant.cold import ColdSpecError, apply_cold

DEVICE = QuantConfig.parse("int4:k8v4:g32:gv16:r16:s4")
COLD = QuantConfig.parse("int:k3v2:g64:gv16:s1:hadv")
BT = 64  # tokens per block: one cold key group


@pytest.fixture(scope="module")
def cache():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2)  # head_dim 16
    model = LlamaForCausalLM(cfg).eval()
    c = QuantizedKVCache(DEVICE, cfg.num_hidden_layers)
    with torch.no_grad():
        model(torch.randint(0, 64, (1, 4 + 3 * BT + 40)), past_key_values=c, use_cache=True)
    return c


def shape_of(state):
    return ModelShape.of_state(state)


def codecs(state, fingerprint="m", quant=DEVICE):
    """(the cold codec, the lossless one) for blocks of `state`."""
    ctx = BlockContext(quant, shape_of(state), BT, fingerprint)
    return ColdCodec(ctx, COLD.spec()), RansCtxCodec(ctx)


def test_blockwise_cold_equals_region_cold_and_round_trips_exactly(cache):
    state = cache.export_state()
    cold, lossless = codecs(state)
    n = blk.whole_blocks(state, BT)
    parts, tail = blk.split(state, BT, n)
    warm_parts = []
    for i, part in enumerate(parts):
        cb = cold.encode(part, i)
        warm = cb.tensors
        assert cb.content == content_hash(warm)
        got = cold.decode(cb.data, i, cb.content)
        assert [(a, b.tobytes()) for a, b in got] == [(a, b.tobytes()) for a, b in warm]
        assert len(cb.data) < len(lossless.encode(part, i).data)
        warm_parts.append(warm)
    ref = QuantizedKVCache.from_state(state, torch.device("cpu"), None)
    # region-wide cold over only the whole blocks: cut the cache's sealed region to those blocks first
    joined = blk.join(warm_parts, tail)
    ref_state = ref.export_state()
    apply_cold(ref, COLD)
    expect = blk.split(ref.export_state(), BT, n)[0]
    assert n == 3 and all(content_hash(a) == content_hash(b) for a, b in zip(warm_parts, expect))
    assert joined.num_tokens == ref_state.num_tokens
    changed = sum(not np.array_equal(a, b) for (_, a), (_, b) in zip(warm_parts[1], parts[1]))
    assert changed > 0  # lossy: the warm codes differ from the device codes


def test_tampered_or_foreign_cold_blocks_are_refused(cache):
    state = cache.export_state()
    cold, _ = codecs(state)
    part = blk.split(state, BT, 1)[0][0]
    cb = cold.encode(part, 0)
    flipped = bytearray(cb.data)
    flipped[len(flipped) // 2] ^= 1
    for bad, index, content in [(bytes(flipped), 0, None), (cb.data[:-7], 0, None), (cb.data, 1, None),
                                (cb.data, 0, bytes(32))]:
        with pytest.raises(ContainerError):
            cold.decode(bad, index, content)
    with pytest.raises(ContainerError):
        codecs(state, fingerprint="other")[0].decode(cb.data, 0)
    other_spec = codecs(state, quant=QuantConfig.parse("int4:k8v4:g32:gv16:r16:s2"))[0]
    with pytest.raises(ContainerError):
        other_spec.decode(cb.data, 0)


def test_cold_specs_that_cannot_store_blocks_are_refused():
    with pytest.raises(ColdSpecError, match="multiple of the cold key group"):
        check_cold(DEVICE, QuantConfig.parse("int:k3v2:g128:gv16"), 64)
    with pytest.raises(ColdSpecError, match="prerope"):
        check_cold(DEVICE, QuantConfig.parse("int:k3v2:g64:gv16:prerope"), 64)
    with pytest.raises(ColdSpecError, match="layers"):
        check_cold(DEVICE, QuantConfig.parse("int:g64:gv16:lb3232"), 64, layers=3)
    check_cold(DEVICE, COLD, 128, layers=2)


def test_a_well_formed_container_with_foreign_tensors_is_refused_not_crashed(cache):
    """Decoding gives exactly the recorded warm block or raises ContainerError, whatever the tensors."""
    from kvstore.codec.container import Codec, Kind
    from kvstore.codec.kv import decode_kv, encode_kv
    from kvstore.quant.state import KVState

    state = cache.export_state()
    cold, _ = codecs(state)
    part = blk.split(state, BT, 2)[0][1]
    cb = cold.encode(part, 1)
    warm = cb.tensors
    good = decode_kv(cb.data, kind=Kind.COLD_BLOCK)
    other = dict(decode_kv(cold.encode(blk.split(state, BT, 2)[0][0], 0).data, kind=Kind.COLD_BLOCK).tensors)
    rng = np.random.default_rng(0)
    variants = [
        [(n, a[..., :1]) for n, a in good.tensors],  # shapes cut short
        [(n, rng.integers(0, 255, a.shape, dtype=np.uint8)) if a.dtype == np.uint8 else (n, a)
         for n, a in good.tensors],  # codes replaced: warms up to other bytes
        [(n, np.full_like(a, np.inf)) if a.dtype == np.float16 else (n, a) for n, a in good.tensors],  # steps
        good.tensors[:3],  # layers missing
        [(n, a[: a.size // 2]) if n == VALUES else (n, a) for n, a in good.tensors],  # value payload cut
        [(n, other[VALUES]) if n == VALUES else (n, a) for n, a in good.tensors],  # another block's values
        [(n, a) for n, a in good.tensors if n != VALUES],  # values missing
    ]
    for tensors in variants:
        forged = encode_kv(KVState(good.num_tokens, good.quant_spec, good.meta, tensors), model_fingerprint="m",
                           codec=Codec.ZSTD_STREAMS, kind=Kind.COLD_BLOCK)
        with pytest.raises(ContainerError):
            cold.decode(forged, 1, cb.content)
    # other dtypes holding the same values warm up to the recorded bytes: accepted, and exactly those
    same = encode_kv(KVState(good.num_tokens, good.quant_spec, good.meta,
                             [(n, a.astype(np.float32)) for n, a in good.tensors]), model_fingerprint="m",
                     codec=Codec.ZSTD_STREAMS, kind=Kind.COLD_BLOCK)
    try:
        got = cold.decode(same, 1, cb.content)
    except ContainerError:
        return
    assert [(n, a.tobytes()) for n, a in got] == [(n, a.tobytes()) for n, a in warm]


def test_cold_container_holds_each_tensor_family_together_and_block_0_sinks_at_bf16(cache):
    from kvstore.codec.container import Kind
    from kvstore.codec.kv import decode_kv

    state = cache.export_state()
    cold, _ = codecs(state)
    parts, _ = blk.split(state, BT, blk.whole_blocks(state, BT))
    cb = cold.encode(parts[0], 0)
    names = [n for n, _ in decode_kv(cb.data, kind=Kind.COLD_BLOCK).tensors]
    fields = [n.partition(".")[2] for n in names]
    assert fields == sorted(fields)  # family by family
    stacked = {n.partition(".")[2] for n in names if n.startswith("all.")}
    assert {"kc_codes", "kc_base", "kc_step", "vc_rans"} <= stacked  # one tensor each; values in one rANS payload
    assert [n for n in names if not n.startswith("all.")] == ["0.k_sink", "1.k_sink", "0.v_sink", "1.v_sink"]
    warm, device = dict(cb.tensors), dict(parts[0])
    for layer in range(2):
        sink, orig = torch.from_numpy(warm[f"{layer}.k_sink"]), torch.from_numpy(device[f"{layer}.k_sink"])
        assert torch.equal(sink, orig.bfloat16().float())


def test_a_version_1_cold_block_still_decodes_and_an_unknown_version_is_refused(cache):
    from kvstore.codec.container import pack_container, unpack_container

    state = cache.export_state()
    cold, _ = codecs(state)
    part = blk.split(state, BT, blk.whole_blocks(state, BT))[0][1]
    cb = cold.encode(part, 1)
    kind, codec, meta, payload = unpack_container(cb.data)
    for v, ok in ((1, True), (2, True), (3, True), (4, False)):
        data = pack_container(kind, codec, {**meta, "meta": {**meta["meta"], "v": v}}, payload)
        if ok:
            assert [(n, a.tobytes()) for n, a in cold.decode(data, 1, cb.content)] == \
                [(n, a.tobytes()) for n, a in cb.tensors]
        else:
            with pytest.raises(ContainerError, match="v=4"):
                cold.decode(data, 1, cb.content)


def test_qk_blocks_carry_their_key_weights_and_decode_without_the_model(cache):
    from kvstore.codec.container import Kind
    from kvstore.codec.kv import decode_kv

    state = cache.export_state()
    shape = shape_of(state)
    qk = COLD.replace(query_keys=True).spec()
    exps = np.random.default_rng(0).integers(-3, 4, (shape.layers, shape.kv_heads, shape.head_dim)).astype(np.int8)
    with pytest.raises(ColdSpecError, match="key weight"):  # qk without the model's weights: refused up front
        ColdCodec(BlockContext(DEVICE, shape, BT, "m"), qk)
    with pytest.raises(ColdSpecError, match="key weight"):
        ColdCodec(BlockContext(DEVICE, shape, BT, "m", exps[:1]), qk)
    cold = ColdCodec(BlockContext(DEVICE, shape, BT, "m", exps), qk)
    reader = ColdCodec(BlockContext(DEVICE, shape, BT, "m"))  # decoding needs no weights: the block has them
    plain, _ = codecs(state)
    parts, _ = blk.split(state, BT, blk.whole_blocks(state, BT))
    for i, part in enumerate(parts):
        cb = cold.encode(part, i)
        stored = decode_kv(cb.data, kind=Kind.COLD_BLOCK)
        assert stored.meta["v"] == 3
        wexp = dict(stored.tensors)["all.kc_wexp"]
        assert wexp.shape == (shape.layers, 1, shape.kv_heads, shape.head_dim, BT // COLD.key_group)
        assert np.array_equal(wexp[..., 0], exps[:, None])
        got = reader.decode(cb.data, i, cb.content)
        assert [(n, a.tobytes()) for n, a in got] == [(n, a.tobytes()) for n, a in cb.tensors]
        assert cb.content != plain.encode(part, i).content  # the weights changed the warm keys


def test_a_version_2_block_with_zstd_coded_values_still_decodes(cache):
    """v2 blocks hold the value families as stacked tensors (zstd), v3 as one rANS payload: both decode."""
    from kvstore.codec.cold_block import _decode_values, _layers, _stack, _value_layout
    from kvstore.codec.container import Kind
    from kvstore.codec.kv import decode_kv, encode_kv

    state = cache.export_state()
    cold, _ = codecs(state)
    part = blk.split(state, BT, blk.whole_blocks(state, BT))[0][1]
    cb = cold.encode(part, 1)
    v3 = decode_kv(cb.data, kind=Kind.COLD_BLOCK)
    layers = _layers([(n, a) for n, a in v3.tensors if n != VALUES], 2)
    _decode_values(layers, dict(v3.tensors)[VALUES], *_value_layout(DEVICE, COLD, shape_of(state), BT))
    assert all({"vc_codes", "vc_scale", "vc_zero"} <= set(f) for f in layers.values())
    v2 = type(v3)(num_tokens=v3.num_tokens, quant_spec=v3.quant_spec, meta={**v3.meta, "v": 2},
                  tensors=_stack(layers))
    data = encode_kv(v2, model_fingerprint="m", codec=cold.container[1], kind=cold.container[0])
    assert len(data) > len(cb.data)  # zstd codes the values larger than the rANS payload
    assert [(n, a.tobytes()) for n, a in cold.decode(data, 1, cb.content)] == \
        [(n, a.tobytes()) for n, a in cb.tensors]


@pytest.mark.parametrize("spec", ["int:k3v16:g64:gv16:s1", "int:k16v2:g64:gv16", "int:g64:gv16:lb2f32",
                                  "int:k4v3:g64:gv8:clipv"])
def test_value_payload_round_trips_with_passed_through_and_mixed_value_bits(cache, spec):
    state = cache.export_state()
    codec = ColdCodec(BlockContext(DEVICE, shape_of(state), BT, "m"), spec)
    for i, part in enumerate(blk.split(state, BT, blk.whole_blocks(state, BT))[0]):
        cb = codec.encode(part, i)
        assert [(n, a.tobytes()) for n, a in codec.decode(cb.data, i, cb.content)] == \
            [(n, a.tobytes()) for n, a in cb.tensors]
