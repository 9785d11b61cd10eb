import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvstore.codec.container import (HEADER_SIZE, Codec, ContainerError, Kind, pack_container,
                                     unpack_container)

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
