"""`QuantizedKVLayer`: one attention layer's KV, held as bit-packed codes plus a full-precision window.

Layout (KIVI): keys are quantized per channel in groups of `key_group` tokens along the token axis;
values per token in groups of `value_group` elements along head_dim.

State, for a layer holding `n` tokens:
    sinks: the first `n_sink = min(n, sinks)` tokens in the model dtype, k_sink/v_sink [B, H, n_sink, D]
    sealed region: the next `n_sealed` tokens, whole blocks of `key_group` tokens, each side sealed by
      `side.seal` (names prefixed "k_"/"v_"):
        k_codes [B, H, n_sealed, packed(D)] uint8   k_scale/k_zero [B, H, n_sealed / key_group, D] fp16
        v_codes [B, H, n_sealed, packed(D)] uint8   v_scale/v_zero [B, H, n_sealed, D / value_group] fp16
        with outliers: k_oidx/k_oval, v_oidx/v_oval [n_sealed / key_group, k]
      (a 16-bit side keeps its sealed tokens as k_fp/v_fp [B, H, n_sealed, D] instead)
    window: the last `n - n_sink - n_sealed` tokens, one `kvstore.quant.window` per side (`self.keys`,
      `self.values`): in the model dtype, k_win/v_win; or with `window_bits=8` INT8 codes k_win/v_win
      [B, H, w, D] int8 with fp16 scales k_win_scale/v_win_scale [B, H, w, 1]. Sinks never pass through
      the window (they stay in the model dtype); sealing quantizes the window entries as read (with w8:
      the dequantized INT8 values, in the model dtype).

Options (from `QuantConfig`): per-layer bits (`bits_for(layer_idx)`); Hadamard rotation per side; keys
sealed before RoPE (`pre_rope`: the window keeps post-RoPE keys, sealed keys are un-rotated by RoPE at
their positions and re-rotated on read); and `rotated_attention`, where rotated sides are returned in the
rotated basis (`returns_rotated`) for an attention that rotates queries and outputs instead.

Invariants:
- Without eviction, `n_sealed == floor(max(0, n - n_sink - residual) / key_group) * key_group` after every
  `update`: the state is a function of the token positions alone, never of how they were chunked.
- With eviction (`evictor`, see kvstore/quant/evict.py) the window is [staged | unjudged]: staged entries were
  judged and kept and are sealed by whole blocks; `n_evicted` positions are gone, and `get_mask_sizes`
  maps the held entries onto the last positions. `get_seq_length` still counts positions.
- A key group is sealed only when it is full and wholly outside the recent window — or by `seal_all`
  (adopting a stored prefix), after which `n_sealed == max(window rule, forced)`.
- A key group's sealed bits depend only on its own tokens' keys/values and positions, never on how many
  groups were sealed at once.
- Export then import gives bit-identical tensors (`tensors` / `from_tensors`).
- The decode view (`view`, kvstore/quant/view.py): while a session decodes, a layer whose reads are
  elementwise (no rotation undone on read, keys not sealed before RoPE) keeps its sinks, sealed region and
  window as attention reads them, rewritten group by group as tokens seal, so a step writes only its new
  rows and attention reads one buffer, no copy of the history. Every reading is a function of its own
  token (dequantizing is elementwise; a window side handed to attention rotated is rotated row by row,
  `hadamard_rows`), so the view is bit-identical to a full read; it is scratch,
  never exported, counted in `device_bytes`, and dropped (`drop_view`) when the session's call ends.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import CacheLayerMixin

from kvstore.config import QuantConfig
from kvstore.quant import side as sides
from kvstore.quant.evict import Evictor
from kvstore.quant.rope import Rope
from kvstore.quant.rotation import hadamard, hadamard_matrix, hadamard_rows
from kvstore.quant.view import DecodeView
from kvstore.quant.window import WINDOW_FIELDS, NewRows, Window, window_kind


def sealed_by_rule(config: QuantConfig, num_tokens: int, n_sink: int) -> int:
    """Tokens the window rule seals (without eviction) once a layer holds `num_tokens`, `n_sink` of them sinks:
    whole key groups outside the recent `residual` tokens."""
    return max(0, num_tokens - n_sink - config.residual) // config.key_group * config.key_group


class QuantizedKVLayer(CacheLayerMixin):
    is_sliding = False
    is_croppable = True

    def __init__(self, config: QuantConfig, layer_idx: int = 0, rope: Rope | None = None,
                 evictor: Evictor | None = None):
        super().__init__()
        self.evictor = evictor
        self.n_staged = 0  # with eviction: window entries already judged and kept, waiting for a whole block
        self.n_evicted = 0
        self.config = config
        self.layer_idx = layer_idx
        self.bits = config.bits_for(layer_idx)  # (key_bits, value_bits)
        self.pre_rope = config.pre_rope and self.bits[0] != 16
        if self.pre_rope and rope is None:
            raise ValueError("prerope needs the model's RoPE (build the cache with QuantizedKVCache.for_model)")
        self.rope = rope
        self.num_tokens = 0
        self.n_sealed = 0
        self.window = window_kind(config.window_bits)
        self.keys: Window | None = None  # the recent window of each side (module docstring)
        self.values: Window | None = None
        self.forced = 0  # sealed tokens forced by seal_all (a floor under the window rule)
        self.sealed: dict[str, torch.Tensor] = {}  # name -> tensor, names as in the module docstring
        self.head_dim = 0
        rot = set(config.rotate) if config.rotated_attention else set()
        # sides handed to attention in the rotated basis: keys only when RoPE is applied after un-rotating
        self.returns_rotated = {"k": "k" in rot and not self.pre_rope and self.bits[0] != 16,
                                "v": "v" in rot and self.bits[1] != 16}
        self.view: DecodeView | None = None  # the decode view (module docstring), or None
        self._view_ok = self.bits != (16, 16) and not self.pre_rope and not any(
            side in config.rotate and not self.returns_rotated[side] for side in ("k", "v"))

    # ---- transformers Cache layer protocol -------------------------------------------------
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.head_dim = key_states.shape[-1]
        if self.bits[1] != 16 and self.head_dim % self._value_group:
            raise ValueError(
                f"value_group={self.config.value_group} does not divide head_dim={self.head_dim}"
            )
        if self.config.rotate and not self.config.is_full_precision:
            hadamard_matrix(self.head_dim)  # raises for a head_dim that is not a power of two
        empty = key_states[..., :0, :]
        self.keys, self.values = self.window.quantize(empty.clone()), self.window.quantize(empty.clone())
        self.is_initialized = True

    @property
    def _value_group(self) -> int:
        return min(self.config.value_group, self.head_dim)

    def plan(self, side: str) -> sides.SidePlan:
        cfg = self.config
        group, dim = (cfg.key_group, -2) if side == "k" else (self._value_group, -1)
        return sides.SidePlan(bits=self.bits[side == "v"], group=group, dim=dim, block=cfg.key_group,
                              rotate=side in cfg.rotate, outliers=cfg.outliers,
                              clip=side in cfg.clip)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, new: NewRows | None = None,
               **kwargs):
        """Append [B, H, q, D] keys/values; return all keys/values [B, H, n, D] for attention.

        `new`, when given, holds the new tokens already in this layer's window form with their readings (a
        batched pass computes them for all its rows at once; they are per token, so the bits are the same);
        it is used when none of the new tokens goes to the sinks."""
        if new is not None and self.appends_one(new):  # a decode step's common case, the short way
            return self.append_one(new)
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        q = key_states.shape[-2]
        taken = self._take_sinks(key_states, value_states)
        if taken < q:
            if new is None or taken:
                new_k = self.window.quantize(key_states[..., taken:, :])
                new_v = self.window.quantize(value_states[..., taken:, :])
            else:
                new_k, new_v = new.keys, new.values
            self.keys, self.values = self.keys.cat(new_k), self.values.cat(new_v)
        self.num_tokens += q
        if self.evictor is not None:
            self.evictor.append(self.layer_idx, q, taken, self.keys.device)
        self._seal()
        if self._view_ok:
            return self._read_view(new)
        k_win, v_win = self._window_reading("k"), self._window_reading("v")
        if self.n_sealed == 0 and self.n_sink == 0:
            return k_win, v_win
        k_old, v_old = self.dequantized_sealed(rotated=True)
        return torch.cat([k_old, k_win], dim=-2), torch.cat([v_old, v_win], dim=-2)

    def appends_one(self, new: NewRows) -> bool:
        """Whether `update(new=new)` is one token that only appends: the sinks are full, no eviction, the
        decode view holds every entry, and no key group seals after it. The short way (`append_one`) then
        does exactly what the general one would (append to the window, write the new readings into the view,
        read it)."""
        view, cfg = self.view, self.config
        if view is None or self.evictor is not None or new.k_read.shape[-2] != 1 or self.num_tokens < cfg.sinks:
            return False
        if view.n != cfg.sinks + self.n_sealed + len(self.keys):  # the sinks are full: n_sink == sinks
            return False
        return sealed_by_rule(cfg, self.num_tokens + 1, cfg.sinks) <= self.n_sealed

    def append_one(self, new: NewRows) -> tuple[torch.Tensor, torch.Tensor]:
        """`update(k, v, new=new)` for a step `appends_one` admits, without the keys and values themselves
        (`new` holds all that is kept of them): every key and value for attention, from the decode view."""
        self.keys, self.values = self.keys.cat(new.keys), self.values.cat(new.values)
        self.num_tokens += 1
        return self.view.append(new.reads)

    def append_one_unread(self, keys, values) -> int:
        """`append_one` for a step `appends_one` admits, its readings written by the caller: the window entries
        `keys`/`values` are appended and the decode view's next row reserved for the readings (the view must
        have room: `view.make_room()`). Returns the number of rows the view then holds."""
        self.keys, self.values = self.keys.cat(keys), self.values.cat(values)
        self.num_tokens += 1
        return self.view.reserve()

    @property
    def reading_form(self) -> tuple:
        """Layers of one form compute the same `new_rows` for the same keys and values."""
        return self.window, self.returns_rotated["k"], self.returns_rotated["v"]

    def new_rows(self, key: torch.Tensor, value: torch.Tensor) -> NewRows:
        """Window entries and attention readings of [R, H, q, D] new keys/values, for `update(new=...)`."""
        return NewRows.of(self.window, key, value, key.dtype, rotated=self.reading_form[1:])

    def _window_reading(self, side: str, start: int = 0) -> torch.Tensor:
        """Window entries [start, w) of a side as attention receives them: read in the model dtype, rotated
        row by row (`hadamard_rows`: a token's reading is its own) when the side goes to attention rotated."""
        x = (self.keys if side == "k" else self.values).read(self.dtype, start)
        return hadamard_rows(x) if self.returns_rotated[side] else x

    def _read_view(self, new: NewRows | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Every held entry as attention reads it, from the decode view (window rows included): rows not yet
        in the view are read from the window (or taken from `new`'s readings when they are exactly its rows)
        and written; a view missing part of the sealed region is rebuilt."""
        prefix = self.n_sink + self.n_sealed
        if self.view is None or self.view.n < prefix:
            k, v = self._window_reading("k"), self._window_reading("v")
            if prefix:
                k_old, v_old = self.dequantized_sealed(rotated=True)
                k, v = torch.cat([k_old, k], dim=-2), torch.cat([v_old, v], dim=-2)
            self.view = DecodeView(k, v)
        elif new is not None and self.view.n == prefix + len(self.keys) - new.k_read.shape[-2]:
            self.view.write_both(self.view.n, new.reads)
        elif self.view.n < prefix + len(self.keys):
            start = self.view.n - prefix
            self.view.write(self.view.n, self._window_reading("k", start), self._window_reading("v", start))
        return self.view.read()

    def drop_view(self) -> None:
        self.view = None

    @property
    def stored_tokens(self) -> int:
        """Token entries held (positions seen minus evicted ones)."""
        return self.num_tokens - self.n_evicted

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        # the held entries map to the last positions, so causal masking stays right after eviction
        return self.stored_tokens + query_length, self.n_evicted

    def get_seq_length(self) -> int:
        return self.num_tokens

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.keys = self.values = None
        self.sealed = {}
        self.view = None
        self.num_tokens = self.n_sealed = self.forced = 0
        self.is_initialized = False

    def crop(self, tokens_to_remove: int) -> None:
        """Drop the last `-tokens_to_remove` tokens; only tokens still in the full-precision window can go."""
        if tokens_to_remove > 0:
            raise ValueError("crop takes a negative count of tokens to remove")
        n = -tokens_to_remove
        if n == 0 or not self.is_initialized:
            return
        if n > len(self.keys):
            raise ValueError(f"cannot crop {n} tokens: only {len(self.keys)} are unsealed")
        if self.evictor is not None and self.layer_idx == 0:
            self.evictor.crop(n)
        self.keys = self.keys.slice(0, -n)
        self.values = self.values.slice(0, -n)
        self.num_tokens -= n
        if self.view is not None:
            self.view.truncate(self.stored_tokens)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        raise NotImplementedError("QuantizedKVLayer does not support beam search")

    # ---- sinks and sealing ------------------------------------------------------------------------
    @property
    def n_sink(self) -> int:
        return self.sealed["k_sink"].shape[-2] if "k_sink" in self.sealed else 0

    def _take_sinks(self, key_states: torch.Tensor, value_states: torch.Tensor) -> int:
        """Put the first of the new tokens into the sink region until it holds `sinks` tokens; returns how many.

        While the sinks are not full every token went to them, so the window is empty and the sink tokens
        are the first new ones: they never pass through the window."""
        take = min(self.config.sinks - self.n_sink, key_states.shape[-2])
        if take <= 0:
            return 0
        self.view = None  # rebuilt with the new sink rows
        for side, x in (("k", key_states), ("v", value_states)):
            head = x[..., :take, :]
            name = f"{side}_sink"
            self.sealed[name] = head.clone() if name not in self.sealed else torch.cat([self.sealed[name], head], -2)
        return take

    def evict(self, decided: int, drop: torch.Tensor | None) -> None:
        """Apply the evictor's plan between steps: of the `decided` oldest unjudged window entries, drop
        `drop` and stage the rest; then seal whole staged blocks."""
        if not decided:
            return
        keep = torch.ones(decided, dtype=torch.bool, device=self.keys.device)
        if drop is not None:
            keep[drop.to(keep.device)] = False
        w = len(self.keys)
        idx = torch.cat([torch.arange(self.n_staged, device=keep.device), self.n_staged + keep.nonzero()[:, 0],
                         torch.arange(self.n_staged + decided, w, device=keep.device)])
        self.keys, self.values = self.keys.select(idx), self.values.select(idx)
        if self.view is not None:
            self.view.truncate(self.n_sink + self.n_sealed)  # the window's rows moved
        self.n_staged += int(keep.sum())
        self.n_evicted += decided - int(keep.sum())
        self._seal()

    def _seal(self) -> None:
        cfg = self.config
        if self.evictor is not None:  # staged (judged and kept) entries are sealed by whole blocks
            target = self.n_sealed + self.n_staged // cfg.key_group * cfg.key_group
        else:
            target = sealed_by_rule(cfg, self.num_tokens, self.n_sink)
        if target <= self.n_sealed:
            return
        self._seal_tokens(target - self.n_sealed)

    def _seal_tokens(self, m: int) -> None:
        """Move the window's first `m` tokens (whole key groups) into the sealed region."""
        prefix = self.n_sink + self.n_sealed
        k_new = self.keys.read(self.dtype, 0, m)
        if self.pre_rope:
            k_new = self.rope.invert(k_new, prefix, self.layer_idx)
        if self.view is not None and self.view.n < prefix:
            self.view = None  # stale: rebuilt on the next read
        reads = {}
        for side, x in (("k", k_new), ("v", self.values.read(self.dtype, 0, m))):
            plan = self.plan(side)
            # Rotation and outlier selection reduce over many elements; seal them one key group at a time so
            # a group's bits never depend on how many groups were sealed together (prefix blocks rely on it).
            step = self.config.key_group if plan.bits != 16 and (plan.rotate or plan.outliers) else m
            pieces = [sides.seal(x[..., i:i + step, :], plan) for i in range(0, m, step)]
            if self.view is not None:  # the sealed reading replaces the window's rows of these tokens
                new = [sides.read(p, plan, self.head_dim, rotated_out=self.returns_rotated[side]) for p in pieces]
                reads[side] = torch.cat([t.to(self.dtype) for t in new], dim=-2)
            for name in pieces[0]:
                t = pieces[0][name] if len(pieces) == 1 else torch.cat([p[name] for p in pieces], dim=-2)
                name = f"{side}_{name}"  # every sealed tensor grows along dim -2 (tokens or blocks)
                self.sealed[name] = t if name not in self.sealed else torch.cat([self.sealed[name], t], dim=-2)
        if self.view is not None:
            self.view.write(prefix, reads["k"], reads["v"])
        self.keys = self.keys.slice(m)  # a copy: the old window's storage is not kept alive
        self.values = self.values.slice(m)
        self.n_sealed += m
        self.n_staged = max(0, self.n_staged - m)

    def seal_all(self) -> None:
        """Seal every whole key group of the window now (a prefix adopted from stored blocks is all sealed).

        Afterwards `n_sealed` may exceed what the window rule implies; `forced` records that floor, and
        sealing resumes by the rule once the window has grown past it."""
        if self.evictor is not None:
            raise ValueError("seal_all is not supported with token eviction")
        if not self.is_initialized:
            return
        m = len(self.keys) // self.config.key_group * self.config.key_group
        if m:
            self._seal_tokens(m)
        self.forced = self.n_sealed

    def dequantized_sealed(self, rotated: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Sinks and sealed region as [B, H, n_sink + n_sealed, D] tensors in the model dtype.

        With `rotated`, sides in `returns_rotated` come in the rotated basis (what attention receives)."""
        out = []
        for side in ("k", "v"):
            rot = rotated and self.returns_rotated[side]
            parts = []
            if f"{side}_sink" in self.sealed:
                sink = self.sealed[f"{side}_sink"]
                parts.append(hadamard(sink) if rot else sink)
            if self.n_sealed:
                parts.append(self._read_sealed(side, rot))
            out.append(parts[0] if len(parts) == 1 else torch.cat(parts, dim=-2))
        return out[0], out[1]

    def _read_sealed(self, side: str, rotated: bool) -> torch.Tensor:
        """One side's sealed region as [B, H, n_sealed, D] in the model dtype (original basis unless `rotated`)."""
        t = {name[2:]: v for name, v in self.sealed.items() if name[0] == side and name[2:] != "sink"}
        x = sides.read(t, self.plan(side), self.head_dim, rotated_out=rotated)
        if side == "k" and self.pre_rope:
            x = self.rope.apply(x, self.n_sink, self.layer_idx)
        return x.to(self.dtype)

    def probe_window(self) -> tuple[int, torch.Tensor, torch.Tensor] | None:
        """The window's oldest whole blocks, sealed and read back in the basis attention receives.

        Returns (offset of those tokens in the K/V `update` returns, k, v [B, H, w, D]), or None when
        the window has no whole block or the layer keeps everything in full precision. State is unchanged."""
        w = len(self.keys) // self.config.key_group * self.config.key_group if self.is_initialized else 0
        if w == 0 or self.bits == (16, 16):
            return None
        start = self.n_sink + self.n_sealed
        out = []
        for side, x in (("k", self.keys.read(self.dtype, 0, w)), ("v", self.values.read(self.dtype, 0, w))):
            plan = self.plan(side)
            pre = side == "k" and self.pre_rope
            x = self.rope.invert(x, start, self.layer_idx) if pre else x
            y = sides.read(sides.seal(x, plan), plan, self.head_dim, rotated_out=self.returns_rotated[side])
            if plan.bits == 16 and self.returns_rotated[side]:
                y = hadamard(y)
            out.append((self.rope.apply(y, start, self.layer_idx) if pre else y).to(self.dtype))
        return start, out[0], out[1]

    # ---- accounting and export -----------------------------------------------------------------
    def tensors(self) -> dict[str, torch.Tensor]:
        """Every tensor this layer holds, by name (sealed region and window)."""
        if not self.is_initialized:
            return {}
        return {**self.sealed, **self.keys.tensors("k"), **self.values.tensors("v")}

    def device_bytes(self) -> int:
        """Bytes of device memory held, measured from the tensors' storages (not computed on paper), with the
        decode view while there is one."""
        held = sum(t.untyped_storage().nbytes() for t in self.tensors().values())
        return held + (self.view.nbytes() if self.view is not None else 0)

    def state_bytes(self) -> int:
        """Bytes of the layer's state alone (what is exported; no decode view)."""
        return sum(t.untyped_storage().nbytes() for t in self.tensors().values())

    @classmethod
    def from_tensors(
        cls, config: QuantConfig, num_tokens: int, tensors: dict[str, torch.Tensor], dtype: torch.dtype,
        layer_idx: int = 0, rope: Rope | None = None, evictor: Evictor | None = None, n_staged: int = 0,
        n_evicted: int = 0, forced: int = 0,
    ) -> QuantizedKVLayer:
        """Rebuild a layer from `tensors()` output; the inverse of export, bit for bit."""
        layer = cls(config, layer_idx, rope, evictor)
        layer.n_staged, layer.n_evicted, layer.forced = n_staged, n_evicted, forced
        if not tensors:
            return layer
        layer.keys, layer.values = layer.window.from_tensors("k", tensors), layer.window.from_tensors("v", tensors)
        layer.dtype, layer.device = dtype, layer.keys.device
        layer.head_dim = layer.keys.shape[-1]
        layer.sealed = {n: t for n, t in tensors.items() if n not in WINDOW_FIELDS}
        layer.num_tokens = num_tokens
        n_sink = layer.n_sink
        layer.n_sealed = num_tokens - n_evicted - n_sink - len(layer.keys)
        if evictor is not None:  # sealing follows the eviction decisions: only whole blocks, staged < a block
            ok = layer.n_sealed % config.key_group == 0 and 0 <= n_staged < config.key_group
            expected = layer.n_sealed if ok else -1
        else:
            expected = sealed_by_rule(config, num_tokens, n_sink)
            expected = max(expected, forced)
        if n_sink != min(num_tokens, config.sinks) or layer.n_sealed != expected:
            raise ValueError(f"layer state holds {n_sink} sink and {layer.n_sealed} sealed tokens; "
                             f"the config implies {min(num_tokens, config.sinks)} and {expected}")
        layer.is_initialized = True
        return layer
