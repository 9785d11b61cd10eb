"""The block codec registry: every way a block can be stored, and the decoder of any stored block.

Adding a codec is one module with a `BlockCodec` class (`kvstore.codec.block_codec`) and one entry in
`CODECS`. Stores (`kvstore.tiers.coding`) make encoders by name and find a stored block's decoder with
`codec_of`, from the (kind, codec) pair of its container; no other module reads header bytes to choose.

Invariants:
- Names and container pairs are unique over `CODECS` (checked at import).
- `codec_of(data)` names the class whose container pair `data` claims, or raises ContainerError; the class's
  decode then validates everything else (checksum, identity, layout, content).
"""

from __future__ import annotations

from kvstore.codec.block import RansCtxCodec
from kvstore.codec.block_codec import BlockCodec, BlockContext
from kvstore.codec.cold_block import ColdCodec
from kvstore.codec.container import ContainerError, container_type

CODECS: tuple[type[BlockCodec], ...] = (
    RansCtxCodec,  # lossless, what every session stores (the default)
    ColdCodec,  # lossy, idle sessions' blocks when tiers.cold_spec is set
)
DEFAULT = RansCtxCodec.name

_BY_NAME = {c.name: c for c in CODECS}
_BY_CONTAINER = {c.container: c for c in CODECS}
if len(_BY_NAME) != len(CODECS) or len(_BY_CONTAINER) != len(CODECS):
    raise RuntimeError("two block codecs share a name or a container (kind, codec) pair")


def codec_named(name: str) -> type[BlockCodec]:
    try:
        return _BY_NAME[name]
    except KeyError:
        raise ValueError(f"unknown block codec {name!r} (known: {', '.join(_BY_NAME)})") from None


def codec_of(data: bytes) -> type[BlockCodec]:
    """The codec that wrote the stored block `data` (by its container's kind and codec)."""
    pair = container_type(data)
    try:
        return _BY_CONTAINER[pair]
    except KeyError:
        raise ContainerError(f"no block codec stores containers of kind {pair[0].name}, codec {pair[1].name}") from None


class BlockDecoder:
    """Decodes any registered codec's blocks for one context (one decoder instance per codec, made once)."""

    def __init__(self, ctx: BlockContext):
        self.by_class = {c: c(ctx) for c in CODECS}

    def decode(self, data: bytes, index: int, content: bytes | None = None):
        return self.by_class[codec_of(data)].decode(data, index, content)
