import hashlib
import struct

import pytest
import xxhash
from hypothesis import given, settings
from hypothesis import strategies as st

from kvstore.codec.container import (
    FORMAT_VERSION,
    HEADER_SIZE,
    MAGIC,
    Codec,
    ContainerError,
    Kind,
    pack_container,
    unpack_container,
)
from kvstore.digest import checksum

META = {"a": 1, "b": [1, 2], "c": "ü"}


def test_roundtrip_exact():
    blob = pack_container(Kind.KV, Codec.ZSTD, META, b"\x00payload\xff")
    assert unpack_container(blob, expect_kind=Kind.KV) == (Kind.KV, Codec.ZSTD, META, b"\x00payload\xff")


@settings(max_examples=50, deadline=None)
@given(payload=st.binary(max_size=300), key=st.text(max_size=10), val=st.integers())
def test_roundtrip_property(payload, key, val):
    blob = pack_container(Kind.BLOCK, Codec.RAW, {key: val}, payload)
    assert unpack_container(blob) == (Kind.BLOCK, Codec.RAW, {key: val}, payload)


@settings(max_examples=80, deadline=None)
@given(data=st.data())
def test_every_single_bit_flip_is_caught(data):
    blob = bytearray(pack_container(Kind.MANIFEST, Codec.RAW, META, b"some payload bytes"))
    i = data.draw(st.integers(0, len(blob) - 1))
    blob[i] ^= 1 << data.draw(st.integers(0, 7))
    with pytest.raises(ContainerError):
        unpack_container(bytes(blob))


@pytest.mark.parametrize("cut", [0, 3, HEADER_SIZE - 1, HEADER_SIZE, HEADER_SIZE + 5, -1])
def test_truncation_is_rejected(cut):
    blob = pack_container(Kind.KV, Codec.RAW, META, b"x" * 100)
    with pytest.raises(ContainerError, match="truncated"):
        unpack_container(blob[:cut])


def test_trailing_bytes_are_rejected():
    with pytest.raises(ContainerError, match="trailing"):
        unpack_container(pack_container(Kind.KV, Codec.RAW, {}, b"x") + b"!")


def test_bad_magic_version_kind():
    blob = bytearray(pack_container(Kind.KV, Codec.RAW, {}, b"x"))
    with pytest.raises(ContainerError, match="bad magic"):
        unpack_container(b"PKL\x00" + bytes(blob[4:]))
    future = bytes(blob[:4]) + struct.pack("<H", 99) + bytes(blob[6:])
    with pytest.raises(ContainerError, match="unsupported container version 99"):
        unpack_container(future)
    with pytest.raises(ContainerError, match="expected a MANIFEST object, found KV"):
        unpack_container(bytes(blob), expect_kind=Kind.MANIFEST)


def test_not_bytes():
    with pytest.raises(ContainerError, match="expected bytes"):
        unpack_container("text")  # type: ignore[arg-type]


# ---- every corruption is named -------------------------------------------------------------------


def _craft(kind=2, codec=0, meta=b"{}", payload=b"", version=FORMAT_VERSION, magic=MAGIC, sum_of=None) -> bytes:
    """A container built by hand, with a VALID checksum (of `sum_of`'s version; default its own), so that
    later checks are reached: xxh3-128 in version 3, sha256 in 2 (and in future versions), blake2b-128 in 1."""
    head = struct.pack("<4sHBBIQ", magic, version, kind, codec, len(meta), len(payload))
    body = head + meta + payload
    v = version if sum_of is None else sum_of
    digest = {1: lambda: checksum(body), 3: lambda: xxhash.xxh3_128_digest(b"kvstash-sum" + body)}.get(
        v, lambda: hashlib.sha256(b"kvstash-sum" + body).digest()[:16])()
    return head + digest + meta + payload


def test_craft_matches_pack():
    assert FORMAT_VERSION == 3
    assert _craft(meta=b'{"a":1}', payload=b"p") == pack_container(Kind.KV, Codec.RAW, {"a": 1}, b"p")


@pytest.mark.parametrize("version", [1, 2])
def test_dropped_pre_release_versions_1_and_2_are_refused(version):
    with pytest.raises(ContainerError, match=f"unsupported container version {version}"):
        unpack_container(_craft(version=version, meta=b'{"a":1}', payload=b"old payload"))


@pytest.mark.parametrize("region", ["kind", "codec", "checksum", "meta", "payload"])
def test_flipped_byte_in_each_region_is_a_checksum_mismatch(region):
    blob = pack_container(Kind.MANIFEST, Codec.RAW, META, b"some payload bytes")
    meta_len = len(blob) - HEADER_SIZE - len(b"some payload bytes")
    at = {"kind": 6, "codec": 7, "checksum": 25, "meta": HEADER_SIZE + meta_len // 2, "payload": len(blob) - 3}[region]
    bad = bytearray(blob)
    bad[at] ^= 0x40
    with pytest.raises(ContainerError, match="checksum mismatch"):
        unpack_container(bytes(bad))


def test_flipped_length_fields_are_truncation_or_trailing():
    blob = pack_container(Kind.KV, Codec.RAW, META, b"x" * 10)
    longer = bytearray(blob)
    longer[12] += 1  # payload length + 1
    with pytest.raises(ContainerError, match="truncated"):
        unpack_container(bytes(longer))
    shorter = bytearray(blob)
    shorter[12] -= 1
    with pytest.raises(ContainerError, match="trailing"):
        unpack_container(bytes(shorter))


def test_unknown_kind_and_codec_with_a_valid_checksum():
    with pytest.raises(ContainerError, match="unknown container kind 9"):
        unpack_container(_craft(kind=9))
    with pytest.raises(ContainerError, match="unknown container codec 7"):
        unpack_container(_craft(codec=7))


@pytest.mark.parametrize("meta,needle", [(b"[1, 2]", "must be a JSON object"), (b"{", "not valid JSON"),
                                         (b'{"a": NaN}', "not valid JSON"), (b"\xff\xfe", "not valid JSON")])
def test_meta_must_be_a_json_object(meta, needle):
    with pytest.raises(ContainerError, match=needle):
        unpack_container(_craft(meta=meta))


def test_future_version_and_bad_magic_even_with_valid_checksum():
    with pytest.raises(ContainerError, match="unsupported container version 4"):
        unpack_container(_craft(version=4))
    with pytest.raises(ContainerError, match="bad magic"):
        unpack_container(_craft(magic=b"\x80\x04\x95\x00"))  # a pickle stream's opening bytes


def test_wrong_kind_is_rejected_and_right_kind_accepted():
    blob = pack_container(Kind.BLOCK, Codec.ZSTD, {}, b"")
    assert unpack_container(blob, expect_kind=Kind.BLOCK)[0] is Kind.BLOCK
    with pytest.raises(ContainerError, match="expected a KV object, found BLOCK"):
        unpack_container(blob, expect_kind=Kind.KV)


def test_meta_is_canonical_and_must_be_json():
    a = pack_container(Kind.KV, Codec.RAW, {"b": 1, "a": {"y": 2, "x": 1}}, b"")
    b = pack_container(Kind.KV, Codec.RAW, {"a": {"x": 1, "y": 2}, "b": 1}, b"")
    assert a == b
    with pytest.raises(ContainerError, match="not JSON-serializable"):
        pack_container(Kind.KV, Codec.RAW, {"a": object()}, b"")
    with pytest.raises(ContainerError, match="not JSON-serializable"):
        pack_container(Kind.KV, Codec.RAW, {"a": float("nan")}, b"")
    with pytest.raises(ContainerError, match="must be a dict"):
        pack_container(Kind.KV, Codec.RAW, [1], b"")  # type: ignore[arg-type]


def test_buffer_inputs_are_accepted():
    blob = pack_container(Kind.KV, Codec.RAW, META, b"abc")
    for buf in (bytearray(blob), memoryview(blob)):
        assert unpack_container(buf) == (Kind.KV, Codec.RAW, META, b"abc")
