"""Quantization config: the single source of defaults for how KV lives on the device.

A `QuantConfig` is immutable and has a canonical text form (`spec()`), which is what gets hashed
into fingerprints and stored in container headers. `QuantConfig.parse(spec)` is its inverse:

    spec    := scheme (":" knob)*
    scheme  := "fp" | "int8" | "int4" | "int3" | "int2"      (sets key and value bits together)
    knob    := "k" BITS "v" BITS     bits for keys and values separately, e.g. k4v2
             | "g" N                 key group: tokens per channel group (also the sealing unit)
             | "gv" N                value group: head_dim elements per token group
             | "r" N                 full-precision recent window, in tokens
             | "w8" | "w16"          how the recent window is held: INT8 codes with an fp16 scale per token and
                                     head (w8), or the model dtype (w16, the default; never written in specs)
             | "s" N                 attention sinks: the first N tokens stay in full precision
             | "had" | "hadk" | "hadv" Hadamard-rotate head_dim before quantizing: keys and values, or one side
             | "hadattn"             run attention in the rotated basis instead of rotating back (needs had*)
             | "clip" | "clipk" | "clipv"  each sealed quantization group's range is chosen for the least
                                     squared error instead of min-max (kvstore/quant/quantize.py): both
                                     sides or one (values gain at 2-3 bits; keys lose, measured)
             | "out" FRACTION        keep this fraction of each sealed block's values exactly (e.g. out0.01)
             | "prerope"             quantize keys before RoPE (RoPE is re-applied on read)
             | "ev" FRACTION         token eviction rate at the window's edge (off by default), e.g. ev0.4
             | "lb" (K V)+           per-layer bits, two characters per layer (2, 3, 4, 8, or f for 16),
                                     e.g. lb848442 for three layers; overrides k/v bits layer by layer
             | "cw" K V              cold specs only: bits a stored INT8 window keeps per side, 2-8 each
                                     (kvstore/quant/cold.py `cold_window`), e.g. cw53; cw88 (the default)
                                     keeps the window as it is
             | "qk"                  cold specs only: key channels weighted by the model's query energy
                                     (kvstore/quant/key_weights.py), finer steps where queries look

Examples: `fp`, `int4`, `int8:r64`, `int4:k4v2:g64:r128:had:out0.01`, `int4:k8v4:g32:r128:w8`. `QuantConfig.from_spec_or_file` also takes a
file holding a spec (plain text, or TOML with `spec = "..."`), e.g. one written by `kvstash eval alloc`.

Invariant: `QuantConfig.parse(c.spec()) == c` for every valid config.
"""

from __future__ import annotations

import dataclasses
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

SUPPORTED_BITS = (2, 3, 4, 8, 16)  # 16 means "not quantized" (full precision)
_BIT_CHAR = {2: "2", 3: "3", 4: "4", 8: "8", 16: "f"}
_CHAR_BIT = {c: b for b, c in _BIT_CHAR.items()}


class QuantConfigError(ValueError):
    """A KV spec or config value is invalid."""


@dataclass(frozen=True)
class QuantConfig:
    """How the KV cache is quantized on the device (KIVI layout: keys per channel, values per token)."""

    key_bits: int = field(default=4, metadata={"doc": "Bits per key code: 2, 3, 4, 8, or 16 for full precision."})
    value_bits: int = field(default=4, metadata={"doc": "Bits per value code: 2, 3, 4, 8, or 16 for full precision."})
    key_group: int = field(
        default=32,
        metadata={"doc": "Tokens per key group (keys are grouped per channel along the token axis). "
                         "A key group is sealed (quantized) only when full and outside the recent window."},
    )
    value_group: int = field(
        default=32, metadata={"doc": "head_dim elements per value group (values are grouped per token)."}
    )
    residual: int = field(
        default=128, metadata={"doc": "Full-precision recent window, in tokens (HF's residual_length)."}
    )
    sinks: int = field(
        default=0, metadata={"doc": "Attention-sink tokens: the first S tokens stay in full precision."}
    )
    rotate: str = field(
        default="",
        metadata={"doc": "Sides whose head_dim is rotated by a normalized Hadamard matrix before quantizing: "
                         "'', 'k', 'v' or 'kv'."},
    )
    rotated_attention: bool = field(
        default=False,
        metadata={"doc": "Attention runs in the rotated basis (queries rotated, outputs rotated back) "
                         "instead of rotating the cache back on read."},
    )
    clip: str = field(
        default="",
        metadata={"doc": "Sides ('', 'k', 'v' or 'kv') whose sealed quantization groups take the range, of 13 "
                         "shrunk about the midpoint, with the least squared error instead of min-max "
                         "(kvstore/quant/quantize.py)."},
    )
    outliers: float = field(
        default=0.0,
        metadata={"doc": "Fraction of each sealed block's elements kept exactly in an fp16 side table "
                         "(dense-and-sparse); 0 disables."},
    )
    pre_rope: bool = field(
        default=False, metadata={"doc": "Quantize keys before RoPE; RoPE is applied again when they are read."}
    )
    evict: float = field(
        default=0.0,
        metadata={"doc": "Token eviction rate: of each key group of tokens leaving the recent window, this "
                         "fraction with the least accumulated attention is dropped (all layers and heads at once)."},
    )
    layer_bits: tuple[tuple[int, int], ...] = field(
        default=(), metadata={"doc": "Per-layer (key_bits, value_bits); empty means key_bits/value_bits everywhere."}
    )
    window_bits: int = field(
        default=16,
        metadata={"doc": "How the recent window is held: 16 = the model dtype; 8 = INT8 codes with an fp16 "
                         "absmax scale per token and head (kvstore/quant/window.py)."},
    )
    cold_window_bits: tuple[int, int] = field(
        default=(8, 8),
        metadata={"doc": "Cold specs only: (key, value) bits an INT8 window's codes keep when a session is stored "
                         "cold; 8 keeps them as they are (kvstore/quant/cold.py `cold_window`)."},
    )

    query_keys: bool = field(
        default=False,
        metadata={"doc": "Cold specs only: weight each key channel by the model's query energy before the cold "
                         "key grid (kvstore/quant/key_weights.py)."},
    )

    def __post_init__(self) -> None:
        for name in ("key_bits", "value_bits"):
            if getattr(self, name) not in SUPPORTED_BITS:
                raise QuantConfigError(f"{name}={getattr(self, name)} is not one of {SUPPORTED_BITS}")
        if not 1 <= self.key_group <= 4096:
            raise QuantConfigError(f"key_group={self.key_group} must be in [1, 4096]")
        if not 1 <= self.value_group <= 4096:
            raise QuantConfigError(f"value_group={self.value_group} must be in [1, 4096]")
        if not 0 <= self.sinks <= 1 << 16:
            raise QuantConfigError(f"sinks={self.sinks} must be in [0, 65536]")
        if self.window_bits not in (8, 16):
            raise QuantConfigError(f"window_bits={self.window_bits} must be 8 or 16")
        if self.window_bits != 16 and self.is_full_precision:
            raise QuantConfigError("an INT8 window (w8) needs a quantized spec, not fp")
        if not 0 <= self.residual <= 1 << 20:
            raise QuantConfigError(f"residual={self.residual} must be in [0, 2^20]")
        if self.rotate not in ("", "k", "v", "kv"):
            raise QuantConfigError(f"rotate={self.rotate!r} must be '', 'k', 'v' or 'kv'")
        if self.rotated_attention and not self.rotate:
            raise QuantConfigError("hadattn (attention in the rotated basis) needs a rotation: had, hadk or hadv")
        if self.clip not in ("", "k", "v", "kv"):
            raise QuantConfigError(f"clip={self.clip!r} must be '', 'k', 'v' or 'kv'")
        if self.clip and self.is_full_precision:
            raise QuantConfigError("clip needs a quantized spec, not fp")
        if not 0.0 <= self.outliers <= 0.25:
            raise QuantConfigError(f"outliers={self.outliers} must be a fraction in [0, 0.25]")
        if not 0.0 <= self.evict < 1.0:
            raise QuantConfigError(f"evict={self.evict} must be a fraction in [0, 1)")
        if self.evict and self.pre_rope:
            raise QuantConfigError("token eviction (ev) and pre-RoPE keys (prerope) cannot be combined")
        if len(self.cold_window_bits) != 2 or any(not 2 <= b <= 8 for b in self.cold_window_bits):
            raise QuantConfigError(f"cold_window_bits={self.cold_window_bits} must be two bit counts in [2, 8]")
        for i, pair in enumerate(self.layer_bits):
            if len(pair) != 2 or any(b not in SUPPORTED_BITS for b in pair):
                raise QuantConfigError(f"layer_bits[{i}]={pair} must be two of {SUPPORTED_BITS}")

    @property
    def is_full_precision(self) -> bool:
        return all(b == 16 for pair in self.layer_bits or [(self.key_bits, self.value_bits)] for b in pair)

    def bits_for(self, layer: int) -> tuple[int, int]:
        """(key_bits, value_bits) of one layer."""
        if not self.layer_bits:
            return self.key_bits, self.value_bits
        if layer >= len(self.layer_bits):
            raise QuantConfigError(f"layer_bits covers {len(self.layer_bits)} layers; layer {layer} has none")
        return self.layer_bits[layer]

    def cold_only_knobs(self) -> list[str]:
        """The knobs of cold specs only that this config uses, as `spec()` writes them (e.g. ["qk", "cw43"]):
        a device spec must use none."""
        k, v = self.cold_window_bits
        return ["qk"] * self.query_keys + [f"cw{k}{v}"] * (self.cold_window_bits != (8, 8))

    def spec(self) -> str:
        """Canonical spec string; stable across releases because it is hashed into fingerprints."""
        cold_only = self.cold_only_knobs()
        if self.is_full_precision and not self.evict:  # only the knobs that shape a full-precision cache
            defaults = QuantConfig()
            return ":".join(["fp"] + [f"{c}{v}" for c, v, d in (("g", self.key_group, defaults.key_group),
                                                               ("gv", self.value_group, defaults.value_group),
                                                               ("r", self.residual, defaults.residual),
                                                               ("s", self.sinks, 0)) if v != d] + cold_only)
        parts = [f"int:k{self.key_bits}v{self.value_bits}:g{self.key_group}:gv{self.value_group}:r{self.residual}"]
        parts += [f"w{self.window_bits}"] if self.window_bits != 16 else []  # w16 names stay as they were
        parts += [f"s{self.sinks}"] if self.sinks else []
        parts += [{"kv": "had", "k": "hadk", "v": "hadv"}[self.rotate]] if self.rotate else []
        parts += ["hadattn"] if self.rotated_attention else []
        parts += [{"kv": "clip", "k": "clipk", "v": "clipv"}[self.clip]] if self.clip else []
        parts += [f"out{self.outliers:g}"] if self.outliers else []
        parts += ["prerope"] if self.pre_rope else []
        parts += [f"ev{self.evict:g}"] if self.evict else []
        parts += ["lb" + "".join(_BIT_CHAR[b] for pair in self.layer_bits for b in pair)] if self.layer_bits else []
        parts += cold_only
        return ":".join(parts)

    @classmethod
    def parse(cls, spec: str) -> QuantConfig:
        """Parse a KV spec (grammar in the module docstring). Raises QuantConfigError with the offending part."""
        if not isinstance(spec, str) or not spec.strip():
            raise QuantConfigError("empty KV spec")
        parts = spec.strip().lower().split(":")
        scheme, knobs = parts[0], parts[1:]
        kw: dict[str, int | bool] = {}
        if scheme == "fp":
            kw["key_bits"] = kw["value_bits"] = 16
        elif re.fullmatch(r"int(2|3|4|8)?", scheme):
            if scheme != "int":
                kw["key_bits"] = kw["value_bits"] = int(scheme[3:])
        else:
            raise QuantConfigError(f"unknown KV scheme {scheme!r} in {spec!r}: expected fp or int8/int4/int3/int2")
        for knob in knobs:
            if m := re.fullmatch(r"k(\d+)v(\d+)", knob):
                kw["key_bits"], kw["value_bits"] = int(m[1]), int(m[2])
            elif m := re.fullmatch(r"gv(\d+)", knob):
                kw["value_group"] = int(m[1])
            elif m := re.fullmatch(r"g(\d+)", knob):
                kw["key_group"] = int(m[1])
            elif m := re.fullmatch(r"r(\d+)", knob):
                kw["residual"] = int(m[1])
            elif m := re.fullmatch(r"w(8|16)", knob):
                kw["window_bits"] = int(m[1])
            elif m := re.fullmatch(r"s(\d+)", knob):
                kw["sinks"] = int(m[1])
            elif knob in ("had", "hadk", "hadv"):
                kw["rotate"] = {"had": "kv", "hadk": "k", "hadv": "v"}[knob]
            elif knob == "hadattn":
                kw["rotated_attention"] = True
            elif knob in ("clip", "clipk", "clipv"):
                kw["clip"] = {"clip": "kv", "clipk": "k", "clipv": "v"}[knob]
            elif m := re.fullmatch(r"out(\d*\.?\d+(?:e-?\d+)?)", knob):
                kw["outliers"] = float(m[1])
            elif knob == "prerope":
                kw["pre_rope"] = True
            elif m := re.fullmatch(r"ev(\d*\.?\d+)", knob):
                kw["evict"] = float(m[1])
            elif m := re.fullmatch(r"lb([2348f]{2})+", knob):
                chars = knob[2:]
                kw["layer_bits"] = tuple((_CHAR_BIT[chars[i]], _CHAR_BIT[chars[i + 1]]) for i in range(0, len(chars), 2))
            elif knob == "qk":
                kw["query_keys"] = True
            elif m := re.fullmatch(r"cw([2-8])([2-8])", knob):
                kw["cold_window_bits"] = (int(m[1]), int(m[2]))
            else:
                raise QuantConfigError(f"unknown KV spec knob {knob!r} in {spec!r}")
        return cls(**kw)

    @classmethod
    def from_spec_or_file(cls, spec_or_path: str) -> QuantConfig:
        """A spec string, or a file holding one: plain text, or TOML with `spec = "..."` (top level or [kv])."""
        path = Path(spec_or_path)
        if not (path.suffix in (".toml", ".txt", ".spec") and path.is_file()):
            return cls.parse(spec_or_path)
        text = path.read_text(encoding="utf-8")
        if path.suffix == ".toml":
            data = tomllib.loads(text)
            text = data.get("spec") or data.get("kv", {}).get("spec") or ""
            if not text:
                raise QuantConfigError(f"{path} has no `spec` key (top level or in [kv])")
        return cls.parse(text.strip())

    def replace(self, **changes) -> QuantConfig:
        return dataclasses.replace(self, **changes)
