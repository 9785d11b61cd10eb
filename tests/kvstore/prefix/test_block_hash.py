import hashlib
import struct

import numpy as np
import pytest

from kvstore.prefix.block_hash import BlockGrid, BlockHash, KvDomain, Salt, chain, content_key

DOMAIN = KvDomain("f" * 64, "int:k8v4:g32:gv32:r128", 512, 32, "cpu")


def test_chain_is_a_fixed_vector_across_processes_and_releases():
    hashes = chain(list(range(100)), BlockGrid(32), DOMAIN, Salt.for_tenant("acme"))
    assert len(hashes) == 3
    # Stored keys depend on these bytes: changing the hash function or its fields orphans every stored block.
    # The same value from the definition, with hashlib alone: blake2b-256 over length-prefixed fields.
    def h(fields, person):
        d = hashlib.blake2b(digest_size=32, person=person)
        for f in fields:
            d.update(struct.pack("<Q", len(f)) + f)
        return d.digest()

    i64 = lambda v: struct.pack("<q", v)  # noqa: E731
    salt = h([b"tenant", b"acme", b""], b"kvstash-salt")
    dom = h([b"f" * 64, b"int:k8v4:g32:gv32:r128", i64(512), i64(32), b"cpu"], b"kvstash-domain")
    toks = np.arange(32, dtype="<u4").tobytes()
    assert hashes[0].digest == h([b"", toks, dom, salt], b"kvstash-block")
    assert hashes[1].digest == h([hashes[0].digest, np.arange(32, 64, dtype="<u4").tobytes(), dom, salt], b"kvstash-block")
    assert hashes[0].hex == "9fd579dc68f29928d0c6e0ff797d6ab80297547847a6776d60cb0b0c01382a41"


def test_chain_depends_on_every_prefix_token_the_domain_and_the_salt():
    toks = list(range(96))
    base = chain(toks, BlockGrid(32), DOMAIN, Salt.for_tenant("a"))
    changed = chain(toks[:40] + [9999] + toks[41:], BlockGrid(32), DOMAIN, Salt.for_tenant("a"))
    assert base[0] == changed[0] and base[1] != changed[1] and base[2] != changed[2]  # chained
    assert chain(toks, BlockGrid(32), DOMAIN, Salt.for_tenant("b"))[0] != base[0]
    assert chain(toks, BlockGrid(32), KvDomain("f" * 64, "int4", 512, 32, "cpu"), Salt.for_tenant("a"))[0] != base[0]
    assert chain(toks, BlockGrid(32), DOMAIN, Salt.for_tenant("a", key=b"secret"))[0] != base[0]
    assert Salt.public_salt() != Salt.for_tenant("public")  # no tenant name can pose as the public scope


def test_chain_can_continue_from_a_parent_and_mix_public_and_private_salts():
    toks = list(range(128))
    pub, mine = Salt.public_salt(), Salt.for_tenant("a")
    mixed = chain(toks, BlockGrid(32), DOMAIN, lambda i: pub if i < 2 else mine)
    head = chain(toks, BlockGrid(32), DOMAIN, pub, count=2)
    rest = chain(toks, BlockGrid(32), DOMAIN, mine, parent=head[-1], first=2)
    assert mixed == head + rest
    with pytest.raises(ValueError, match="parent"):
        chain(toks, BlockGrid(32), DOMAIN, mine, first=2)


def test_sinks_belong_to_block_zero():
    g = BlockGrid(32, sinks=4)
    assert (g.start(0), g.end(0), g.start(1), g.end(1), g.count(67), g.count(68)) == (0, 36, 36, 68, 1, 2)
    a = chain([1, 2, 3, 4] + list(range(64)), g, DOMAIN, Salt.for_tenant("a"))
    b = chain([9, 2, 3, 4] + list(range(64)), g, DOMAIN, Salt.for_tenant("a"))
    assert a[0] != b[0]


def test_block_hash_is_typed_and_content_keys_are_scoped():
    with pytest.raises(ValueError):
        BlockHash(b"short")
    h = BlockHash(bytes(range(32)))
    assert BlockHash.from_hex(h.hex) == h
    c = bytes(32)
    assert content_key(c, DOMAIN, Salt.for_tenant("a")) != content_key(c, DOMAIN, Salt.for_tenant("b"))
    assert np.asarray(chain(list(range(32)), BlockGrid(32), DOMAIN, Salt.for_tenant("a"))[0].digest).size == 1
