"""What every block codec is: the `BlockCodec` interface, the `BlockContext` it codes for, what it returns.

A stored KV block is one block of a session's sealed cache (`kvstore.layout.layout` names its tensors), wrapped
in a versioned, checksummed container (`kvstore.codec.container`) whose (kind, codec) pair names the codec
that wrote it. A codec is one class implementing `BlockCodec` in a module of its own plus one entry in
`kvstore.codec.registry.CODECS`; nothing else reads container headers to pick a decoder.

Invariants (every codec, checked for every registered one by tests/kvstore/codec/test_registry.py):
- `decode(e.data, index) == e.tensors` bit for bit, for `e = encode(part, index)`, every time; a lossless
  codec has `e.tensors is part`, a lossy one returns the tensors a resume will get back.
- `e.content == content_hash(e.tensors)`: dedup and resume compare content hashes, never container bytes.
- `decode` raises ContainerError for anything that is not that block of that model, spec and shape:
  malformed, truncated, another codec's container, another block position, or another content hash.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np

from kvstore.codec.container import Codec, ContainerError, Kind
from kvstore.config import QuantConfig
from kvstore.digest import hash_fields
from kvstore.layout import ModelShape, Tensors, layout


def content_hash(tensors: Tensors) -> bytes:
    """blake2b-256 over every tensor's name, dtype, shape and little-endian bytes, in order."""
    fields: list = []
    for name, a in tensors:
        a = np.ascontiguousarray(a, dtype=a.dtype.newbyteorder("<"))
        fields += [name, a.dtype.name, ",".join(map(str, a.shape)), a.tobytes()]
    return hash_fields(fields, person=b"kvstash-blkdata")


@dataclass(frozen=True)
class BlockContext:
    """The identity every block of one store is coded for and checked against on decode."""

    quant: QuantConfig  # the device cache's spec the blocks are cut from
    shape: ModelShape
    block_tokens: int
    model_fingerprint: str
    key_exps: np.ndarray | None = field(default=None, compare=False)  # [layers, kv heads, head_dim] int8: the
    # model's cold key weight exponents (kvstore.quant.key_weights), what cold specs with qk encode with

    def layout(self, index: int) -> list[tuple[str, np.dtype, tuple]]:
        return layout(self.quant, self.shape, self.block_tokens, index)


@dataclass(frozen=True)
class EncodedBlock:
    data: bytes  # the container
    content: bytes  # content_hash(tensors): what dedup compares and a session's manifest records
    tensors: Tensors  # what decoding `data` gives back


class BlockCodec(ABC):
    """One way of storing blocks. `spec`: the codec's own parameters (e.g. the cold quant spec), needed to
    encode; decoding reads whatever it needs from the container."""

    name: ClassVar[str]  # how configuration and metrics name it
    container: ClassVar[tuple[Kind, Codec]]  # the container (kind, codec) it writes, unique in the registry
    lossless: ClassVar[bool]  # whether decode gives back the very tensors encoded

    def __init__(self, ctx: BlockContext, spec: str | None = None):
        self.ctx, self.spec = ctx, spec

    @abstractmethod
    def encode(self, part: Tensors, index: int) -> EncodedBlock:
        """Block `index`'s device tensors (layout order) as a container; ContainerError if they do not fit the
        layout, ValueError if this codec needs a spec it was not given."""

    @abstractmethod
    def decode(self, data: bytes, index: int, content: bytes | None = None) -> Tensors:
        """The tensors stored in `data`, after checking that it is block `index` of this context (and holds
        `content`, when given)."""

    def check_layout(self, part: Tensors, index: int) -> None:
        expected = self.ctx.layout(index)
        got = [(n, a.dtype, a.shape) for n, a in part]
        if got != expected:
            raise ContainerError(f"block tensors do not fit the layout of {self.ctx.quant.spec()}: "
                                 f"{got[:2]} vs {expected[:2]}")
