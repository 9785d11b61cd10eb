import numpy as np

from kvstore.prefix.block_hash import BlockHash
from kvstore.prefix.trie import PrefixTrie, TrieNode


def _h(i: int) -> BlockHash:
    return BlockHash(i.to_bytes(32, "little"))


def _node(i: int, parent: int | None, size: int = 100) -> TrieNode:
    return TrieNode(_h(i), None if parent is None else _h(parent), [("0.k_codes", np.zeros(size, np.uint8))], b"c" * 32)


def test_match_returns_the_longest_held_chain():
    t = PrefixTrie(10_000)
    for i in range(4):
        assert t.insert(_node(i, i - 1 if i else None))
    assert [n.hash for n in t.match([_h(0), _h(1), _h(2), _h(9)])] == [_h(0), _h(1), _h(2)]
    assert t.match([_h(1), _h(2)]) == []  # not a chain from block 0
    assert not t.insert(_node(7, 6))  # orphans are refused
    assert not t.insert(_node(2, 1))  # already held
    assert len(t) == 4 and t.nbytes == 400


def test_budget_evicts_least_recently_used_leaves_only():
    t = PrefixTrie(450)
    for i in range(3):
        t.insert(_node(i, i - 1 if i else None))  # chain 0-1-2
    t.insert(_node(10, 0))  # a branch 0-10
    t.match([_h(0), _h(10)])  # touch the branch
    assert t.insert(_node(11, 10))  # over budget: the LRU leaf (2) goes, never an inner node
    assert _h(2) not in t and all(h in t for h in (_h(0), _h(1), _h(10), _h(11)))
    assert t.nbytes == 400 <= t.budget_bytes
    assert [n.hash for n in t.match([_h(0), _h(1), _h(2)])] == [_h(0), _h(1)]


def test_zero_budget_holds_nothing_and_oversized_nodes_are_refused():
    assert not PrefixTrie(0).insert(_node(0, None))
    t = PrefixTrie(150)
    assert not t.insert(_node(0, None, size=200)) and len(t) == 0
    t.insert(_node(0, None))
    assert t.insert(_node(1, 0)) is False and t.nbytes == 100  # the new leaf itself is dropped to fit
