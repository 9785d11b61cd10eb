"""`PrefixTrie`: a worker's hot blocks of canonical prefixes, found by chain hash.

A radix tree over blocks: a node is one block, keyed by its chain hash (which already digests the whole
prefix before it), and knows its parent; a lookup walks a prompt's chain hashes from the root and stops
at the first block not held. Nodes hold the block's tensors (numpy, host memory), its content hash and
whether it lives in the public scope.

Invariants:
- Every held node's parent is held (eviction removes least-recently-used *leaves* only), so a match is
  always a contiguous prefix.
- `nbytes` is the sum of the held tensors' bytes and stays <= `budget_bytes` after every insert (a
  budget of 0 holds nothing).
- Lookups and inserts touch the nodes they pass, so a prefix many sessions share stays resident.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

from kvstore.layout import Tensors
from kvstore.prefix.block_hash import BlockHash


@dataclass
class TrieNode:
    hash: BlockHash
    parent: BlockHash | None
    tensors: Tensors
    content: bytes
    public: bool = False
    children: int = 0
    nbytes: int = field(init=False)

    def __post_init__(self) -> None:
        self.nbytes = sum(a.nbytes for _, a in self.tensors)


class PrefixTrie:
    def __init__(self, budget_bytes: int):
        self.budget_bytes = int(budget_bytes)
        self._nodes: OrderedDict[BlockHash, TrieNode] = OrderedDict()  # least recently used first
        self.nbytes = 0

    def __len__(self) -> int:
        return len(self._nodes)

    def __contains__(self, h: BlockHash) -> bool:
        return h in self._nodes

    def match(self, hashes: list[BlockHash]) -> list[TrieNode]:
        """The held nodes of the longest prefix of `hashes` (a chain from block 0), touching them."""
        out = []
        for h in hashes:
            node = self._nodes.get(h)
            if node is None or node.parent != (out[-1].hash if out else None):
                break
            self._nodes.move_to_end(h)
            out.append(node)
        return out

    def peek(self, hashes: list[BlockHash]) -> int:
        """How many leading blocks of `hashes` are held (no touching: for routing probes)."""
        n, parent = 0, None
        for h in hashes:
            node = self._nodes.get(h)
            if node is None or node.parent != parent:
                break
            n, parent = n + 1, h
        return n

    def insert(self, node: TrieNode) -> bool:
        """Hold `node` (its parent must be held, or it must be block 0); False if refused or already held."""
        if node.hash in self._nodes:
            self._nodes.move_to_end(node.hash)
            return False
        if node.parent is not None and node.parent not in self._nodes:
            return False
        if node.nbytes > self.budget_bytes:
            return False
        if node.parent is not None:
            self._nodes.move_to_end(node.parent)
            self._nodes[node.parent].children += 1
        self._nodes[node.hash] = node
        self.nbytes += node.nbytes
        self._shrink(keep=node.hash)
        return node.hash in self._nodes

    def _shrink(self, keep: BlockHash) -> None:
        while self.nbytes > self.budget_bytes:
            victim = next((n for h, n in self._nodes.items() if n.children == 0 and h != keep), None)
            if victim is None:
                victim = self._nodes[keep]  # only the new node's own chain is left: drop the new leaf itself
            self._remove(victim)

    def _remove(self, node: TrieNode) -> None:
        del self._nodes[node.hash]
        self.nbytes -= node.nbytes
        if node.parent is not None and node.parent in self._nodes:
            self._nodes[node.parent].children -= 1
