"""The block codec registry (kvstore/codec/registry.py): every registered codec keeps the `BlockCodec`
contract, stored bytes find their codec by container alone, and the bytes written are pinned (golden)."""

import hashlib

import pytest

from kvstore.codec.block_codec import BlockContext, content_hash
from kvstore.codec.container import Codec, ContainerError, Kind, pack_container
from kvstore.codec.registry import CODECS, DEFAULT, BlockDecoder, codec_named, codec_of
from kvstore.config import QuantConfig
from kvstore.layout import ModelShape
from kvstore.prefix import blocks as blk
from kvstore.tiers.coding import random_state

DEVICE = "int4:k8v4:g32:gv16:r16:s4"
COLD = "int:k3v2:g64:gv16:s1:hadv"
SPECS = {"rans-ctx": None, "cold": COLD}  # what each registered codec is made with here
SHAPE = ModelShape(layers=2, kv_heads=2, head_dim=16, dtype="torch.float32")
BT = 64


def parts_of(spec: str = DEVICE, seed: int = 3):
    q = QuantConfig.parse(spec)
    state = random_state(q, SHAPE, 3 * BT + 40, seed=seed)
    return q, blk.split(state, BT, blk.whole_blocks(state, BT))[0]


def test_every_codec_is_registered_with_a_spec_here_and_the_default_is_lossless():
    assert set(SPECS) == {c.name for c in CODECS}
    assert codec_named(DEFAULT).lossless
    with pytest.raises(ValueError, match="unknown block codec"):
        codec_named("zip")


@pytest.mark.parametrize("name", sorted(SPECS))
def test_each_codec_round_trips_finds_itself_and_refuses_another_layout_or_content(name):
    q, parts = parts_of()
    ctx = BlockContext(q, SHAPE, BT, "m")
    codec, decoder = codec_named(name)(ctx, SPECS[name]), BlockDecoder(ctx)
    for i, p in enumerate(parts):
        e = codec.encode(p, i)
        assert codec_of(e.data) is type(codec) and e.content == content_hash(e.tensors)
        assert (e.tensors is p) == codec.lossless
        for back in (codec.decode(e.data, i, e.content), decoder.decode(e.data, i, e.content)):
            assert [(n, a.dtype, a.shape, a.tobytes()) for n, a in back] == \
                   [(n, a.dtype, a.shape, a.tobytes()) for n, a in e.tensors]
        with pytest.raises(ContainerError):
            decoder.decode(e.data, 0 if i else 1, None)  # block 0 holds the sinks: another layout
        with pytest.raises(ContainerError):
            decoder.decode(e.data, i, bytes(32))


def test_bytes_that_no_codec_wrote_are_refused_by_the_decoder():
    q, _ = parts_of()
    decoder = BlockDecoder(BlockContext(q, SHAPE, BT, "m"))
    for data in (b"", b"KVST", b"x" * 64, pack_container(Kind.MANIFEST, Codec.RAW, {}, b""),
                 pack_container(Kind.BLOCK, Codec.ZSTD, {}, b"")):
        with pytest.raises(ContainerError):
            decoder.decode(data, 0)


def test_an_encoder_that_needs_a_spec_says_so():
    q, parts = parts_of()
    with pytest.raises(ValueError, match="cold spec"):
        codec_named("cold")(BlockContext(q, SHAPE, BT, "m")).encode(parts[0], 0)


# sha256 of blocks 0-2 of `parts_of(spec)` as each codec writes them. A change here changes the stored format:
# bump the codec's version (or add a codec) instead of editing these.
GOLDEN = {
    ("rans-ctx", DEVICE): "cd701c235c01f21ce11e83ffce1fd84d979cb2c3662d135d99e23d289d601315",
    ("rans-ctx", "int4:g32:gv32:r16:s4:w8"): "fef4473c6be20951102cb8c14b22300423e05f0f183a2ebdcc1b67c00931fe80",
    ("cold", DEVICE): "5c517a9883b62ec29aa222bae7a26982b6b255465ab210774f5ca35607347e5c",  # COLD_VERSION 3
}


@pytest.mark.parametrize("name,spec", sorted(GOLDEN))
def test_the_bytes_written_are_pinned(name, spec):
    q, parts = parts_of(spec)
    codec = codec_named(name)(BlockContext(q, SHAPE, BT, "golden"), SPECS[name])
    h = hashlib.sha256()
    for i, p in enumerate(parts):
        h.update(codec.encode(p, i).data)
    assert len(parts) == 3 and h.hexdigest() == GOLDEN[(name, spec)]
