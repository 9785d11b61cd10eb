"""Prefix sharing: typed chained block hashes, block slicing, the worker's hot prefix trie."""
