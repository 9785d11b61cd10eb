"""`HostTier`: the warm LRU of encoded blocks. Exact contents, order of eviction, byte accounting and counters;
`nbytes` equals the held values' lengths and stays within the budget after every put."""

from kvstore.tiers.host_tier import HostTier


def _keys(tier: HostTier) -> list[str]:
    """The held keys, least recently used first (read directly: `get` would reorder them)."""
    return list(tier._items)


def _check(tier: HostTier) -> None:
    assert tier.nbytes == sum(len(v) for v in tier._items.values()) <= tier.budget_bytes


def test_get_returns_what_was_put_and_counts_hits_and_misses():
    tier = HostTier(100)
    tier.put("a", b"xyz")
    assert tier.get("a") == b"xyz" and tier.get("b") is None and tier.get("a") == b"xyz"
    assert (tier.hits, tier.misses, len(tier), tier.nbytes) == (2, 1, 1, 3)


def test_the_least_recently_used_leaves_first_and_a_get_counts_as_use():
    tier = HostTier(30)
    for k in "abc":
        tier.put(k, k.encode() * 10)
    assert tier.get("a") == b"a" * 10  # a is now the most recent: b is the oldest
    tier.put("d", b"d" * 10)
    assert _keys(tier) == ["c", "a", "d"] and tier.get("b") is None
    _check(tier)


def test_one_large_put_evicts_as_many_as_it_needs():
    tier = HostTier(30)
    for k in "abc":
        tier.put(k, k.encode() * 10)
    tier.put("big", b"x" * 25)
    assert _keys(tier) == ["big"] and tier.nbytes == 25
    _check(tier)


def test_a_value_larger_than_the_budget_is_not_held_and_evicts_nothing():
    tier = HostTier(10)
    tier.put("a", b"a" * 6)
    tier.put("huge", b"h" * 11)
    assert _keys(tier) == ["a"] and tier.nbytes == 6 and tier.get("huge") is None
    tier.put("exact", b"e" * 10)  # exactly the budget fits, alone
    assert _keys(tier) == ["exact"] and tier.nbytes == 10


def test_a_budget_of_zero_holds_nothing():
    tier = HostTier(0)
    tier.put("a", b"a")
    assert len(tier) == 0 and tier.nbytes == 0 and tier.get("a") is None


def test_putting_a_key_again_replaces_its_bytes_and_makes_it_the_most_recent():
    tier = HostTier(20)
    tier.put("a", b"a" * 8)
    tier.put("b", b"b" * 8)
    tier.put("a", b"A" * 4)
    assert _keys(tier) == ["b", "a"] and tier.nbytes == 12 and tier.get("a") == b"A" * 4
    tier.put("c", b"c" * 8)  # 20: fits, nothing leaves
    assert _keys(tier) == ["b", "a", "c"] and tier.nbytes == 20
    _check(tier)


def test_discard_frees_the_bytes_and_ignores_unknown_keys():
    tier = HostTier(20)
    tier.put("a", b"a" * 8)
    tier.put("b", b"b" * 5)
    tier.discard("a")
    tier.discard("never")
    assert _keys(tier) == ["b"] and tier.nbytes == 5 and tier.get("a") is None
    _check(tier)
