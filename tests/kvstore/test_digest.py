from kvstore.digest import checksum, hash_fields, prefix_hashes


def test_length_prefix_prevents_boundary_shifts():
    assert hash_fields([b"ab", b"c"]) != hash_fields([b"a", b"bc"])
    assert hash_fields(["x", 1]) == hash_fields(["x", 1])
    assert hash_fields(["x"], person=b"a") != hash_fields(["x"], person=b"b")


def test_checksum_is_deterministic_and_sensitive():
    assert checksum(b"hello") == checksum(b"hello")
    assert checksum(b"hello") != checksum(b"hellp")
    assert len(checksum(b"")) == 16


def test_prefix_hashes_are_the_hashes_of_each_prefix():
    fields = ["t", "user", "hi", 7, b"\x00raw", "", "assistant", "hello"]
    ends = [0, 1, 3, 3, 5, 8]
    assert prefix_hashes(fields, ends, person=b"p") == [hash_fields(fields[:e], person=b"p") for e in ends]
