"""Lossy cold mode: an idle session's sealed region re-quantized to a lower "cold" spec (pure functions).

Opt-in. When a session goes idle its sealed region (the quantized part, see `QuantizedKVLayer`) can be
stored in a cheaper, lossy cold format; on resume it is brought back to the device format. Quality is what
a resumed session holds, `warm(cold(x))` (`apply_cold` rewrites a cache to exactly that;
`services/eval/cold.py` measures it). Two more lossy steps keep the device format as it is and are
idempotent, so storing a resumed session again changes nothing they already changed:
- `cold_sinks`: fp32 attention sinks rounded to bf16 (16-bit sinks stay as they are);
- `cold_window`: an INT8 window's codes kept at the spec's `cw` bits per side (rounded to multiples of
  2**(8 - bits), the ±127 ends kept); a 16-bit window stays as it is.

    cold_state(device tensors, device, cold, layer_idx, head_dim)  -> cold tensors (the stored format)
    warm_state(cold tensors,   device, cold, layer_idx, head_dim)  -> device tensors (same names, shapes,
                                                                      dtypes as the original region)
    apply_cold(cache, cold)  rewrites every layer's sealed region in place as warm(cold(region))

The cold spec is a `QuantConfig` (grammar in kvstore/config.py), read as follows:
    k/v bits, lb   cold bits per side (per layer with `lb`): 2, 3, 4 or 8; 16 keeps that side's device
                   tensors as they are (pass-through)
    g N            cold key group: tokens per key grid (below), and the unit of cold processing ("cold
                   group"); a multiple of the device key group. A region's last group may be shorter (whole
                   device blocks), so no token stays at device precision for want of a full group
    gv N           cold value group: head_dim elements per token group (values are min-max per token, KIVI)
    s N            the first N tokens of the sealed region are kept at device precision (fp16 copies of
                   their dequantized values): the attention sink, the one token 2-3 bit cold KV cannot
                   afford to blur (measured: s1 halves the KL of a plain k3v3 re-quantization); N < g
    had/hadk/hadv  Hadamard-rotate head_dim of that side before cold quantization (`side.seal`'s rotation)
    clip/clipv     cold values take least-squared-error group ranges (`quantize`'s clip); keys, on their
                   shared grid, are never clipped (clipk is ignored)
    prerope        cold keys are quantized before RoPE (un-rotated at their positions, RoPE re-applied on
                   warm-up); needs the model's `Rope`
    r N            ignored
    cw K V         bits the INT8 window codes keep per side (`cold_window`; cw88, the default, keeps them)
    qk             keys weighted per channel by the model's query energy before the grid (power-of-two
                   weights, `kvstore.quant.key_weights`; stored as `kc_wexp`); needs the weights
    out, ev, hadattn: refused. Device specs with prerope, out or ev are refused too (ColdSpecError, a
    ValueError). Device specs with had*/hadattn are accepted: a device side is read back to the original
    basis (`side.read`) and re-sealed by `side.seal`, which rotates it again, so the cold path sees plain
    values either way; the device term of the error bound then holds in the device's rotated basis.

Keys are not min-max per channel in the cold format but on a uniform grid shared by all channels of a
head (`grid_quantize`): step = RMS over channels of the channels' ranges in the cold group / (2**b - 1),
each channel offset by its own integer base. A wide (outlier) channel thus gets more levels and a narrow
one fewer, for the same absolute error everywhere; codes are not clipped to 2**b levels and cost what they
carry once entropy-coded. Measured on SmolLM2 (cold keys alone): per-channel min-max at 3.2 coded bits per
key and this grid at 2.5 give the same KL; attention logits care about absolute key error, and the wide
channels carry them.

Cold format of one layer (B, H, D = batch, kv heads, head_dim; n sealed tokens, n_g cold groups; every
tensor is laid out for the byte-oriented lossless coder that stores it):
    kc_codes  [B, H, D, n] uint8         key grid codes, channel-major (a channel's codes over time together)
    kc_base   [B, H, D, n_g] int16       per channel and cold group: the grid index of the channel's minimum
    kc_step   [B, H, 1, n_g] fp16        per head and cold group: the grid step
    kc_wexp   [B, H, D, n_g] int8        (qk) per channel and cold group: the key weight's exponent; the grid
                                         holds keys * 2**kc_wexp
    vc_codes  [B, H, n, D * c / 8] uint8 values, `side.seal` codes (2, 4 or 8 bits; 3-bit codes in nibbles,
                                         c = 4, which byte-oriented coders handle far better than 3-bit packing)
    vc_scale, vc_zero [B, H, n, D / gv] fp16   per token and value group
    k_keep, v_keep [B, H, s, D] fp16     the kept first tokens (only in the region's first group)
    a side passed through (cold or device bits 16): that side's device tensors under their own names
    ("k_codes", "k_scale", ... or "k_fp").
Names starting "kc_" grow along dim -1 as cold groups are appended, every other name along dim -2
(`concat_cold`), so a region's cold state is the concatenation of its cold groups' states.

Invariants:
- Deterministic and batch-invariant: every cold group is processed on its own (dequantize, un-RoPE,
  quantize, and back), so `cold_state(region) == concat_cold([cold_state(block_i, start=...)])` bit for
  bit for blocks that start at multiples of the cold group, and the same holds for `warm_state`.
- `warm_state` returns the device format exactly: the names, shapes and dtypes of the input region.
- Error bound (element-wise; x = the device region dequantized, w = dequantized `warm_state` output,
  s_c = the element's cold group scale, s_d = its new device group scale):
      |x - w| <= s_c / 2 + s_d / 2 + (|x| + s_c) * 2**-9 + 1e-6      (plain cold sides; s_c is the
                                                                      key grid step (/ 2**kc_wexp with
                                                                      qk) or the value scale)
      |x - w| <= s_d / 2 + |x| * 2**-9 + 1e-6                         (kept first tokens)
  With a Hadamard-rotated cold side the cold term holds in the rotated basis (so per token in L2 norm:
  ||x - w|| <= ||cold term|| + ||device term||), and with prerope per RoPE pair of channels (i, i + D/2)
  in L2 norm, times RoPE's attention scaling.
"""

from __future__ import annotations

import torch

from kvstore.config import QuantConfig
from kvstore.quant import side as sides
from kvstore.quant.key_weights import pow2
from kvstore.quant.layer import QuantizedKVLayer
from kvstore.quant.pack import pack, unpack
from kvstore.quant.rope import Rope
from kvstore.quant.rotation import hadamard
from kvstore.quant.window import Int8Window

CONTAINER_BITS = {2: 2, 3: 4, 4: 4, 8: 8}  # value code bits -> bits each code takes in the cold format
FP16_MAX = 65504.0


class ColdSpecError(ValueError):
    """The device or cold spec (or the region handed over) cannot be used by cold mode."""


def check_specs(device: QuantConfig, cold: QuantConfig) -> None:
    """Raise ColdSpecError when `device` or `cold` is outside what cold mode supports."""
    if device.cold_only_knobs():
        raise ColdSpecError(f"{', '.join(device.cold_only_knobs())}: cold-spec knobs (tiers.cold_spec), not device "
                            f"ones: {device.spec()}")
    if cold.query_keys and "k" in cold.rotate:
        raise ColdSpecError(f"qk weighs key channels, which a key rotation (had, hadk) mixes: {cold.spec()}")
    for what, bad in (("prerope", device.pre_rope), ("outliers (out)", bool(device.outliers)),
                      ("token eviction (ev)", bool(device.evict))):
        if bad and not device.is_full_precision:
            raise ColdSpecError(f"cold mode does not support device specs with {what}: {device.spec()}")
    for what, bad in (("outliers (out)", bool(cold.outliers)), ("token eviction (ev)", bool(cold.evict)),
                      ("hadattn", cold.rotated_attention)):
        if bad:
            raise ColdSpecError(f"cold specs cannot use {what}: {cold.spec()}")
    if cold.key_group % device.key_group:
        raise ColdSpecError(f"cold key group {cold.key_group} must be a multiple of the device key group "
                            f"{device.key_group}")
    if cold.sinks >= cold.key_group:
        raise ColdSpecError(f"cold kept tokens s{cold.sinks} must be fewer than the cold key group {cold.key_group}")


def _device_plans(device: QuantConfig, layer_idx: int, head_dim: int) -> dict[str, sides.SidePlan]:
    layer = QuantizedKVLayer(device, layer_idx)  # the plans exactly as the cache layer builds them
    layer.head_dim = head_dim
    return {s: layer.plan(s) for s in "kv"}


def _cold_plan(cold: QuantConfig, side: str, layer_idx: int, head_dim: int, n: int) -> sides.SidePlan:
    bits = cold.bits_for(layer_idx)[side == "v"]
    if side == "k":  # one group per channel over the cold group's n tokens
        return sides.SidePlan(bits=bits, group=n, dim=-2, block=n, rotate="k" in cold.rotate)
    gv = min(cold.value_group, head_dim)
    if head_dim % gv:
        raise ColdSpecError(f"cold value group {cold.value_group} does not divide head_dim={head_dim}")
    return sides.SidePlan(bits=bits, group=gv, dim=-1, block=n, rotate="v" in cold.rotate,
                          clip="v" in cold.clip)


def passes_through(device: QuantConfig, cold: QuantConfig, side: str, layer_idx: int) -> bool:
    """Whether a layer's side keeps its device tensors in the cold format (either spec holds it at 16 bits)."""
    i = side == "v"
    return device.bits_for(layer_idx)[i] == 16 or cold.bits_for(layer_idx)[i] == 16


def _side_tensors(tensors: dict[str, torch.Tensor], side: str) -> dict[str, torch.Tensor]:
    return {n[2:]: t for n, t in tensors.items() if n[:2] == f"{side}_" and n[2:] not in ("sink", "keep")}


def _groups(n: int, group: int) -> list[tuple[int, int]]:
    return [(a, min(a + group, n)) for a in range(0, n, group)]


def concat_cold(parts: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Concatenate cold states of consecutive blocks (names "kc_*" along dim -1, the rest along -2)."""
    out: dict[str, list[torch.Tensor]] = {}
    for p in parts:
        for name, t in p.items():
            out.setdefault(name, []).append(t)
    return {name: ts[0] if len(ts) == 1 else torch.cat(ts, dim=-1 if name.startswith("kc_") else -2)
            for name, ts in out.items()}


def grid_quantize(x: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Keys of one cold group x [B, H, n, D] on a uniform grid shared by a head's channels.

    step [B, H, 1, 1] fp16 = RMS over channels of the channels' ranges / (2**bits - 1), raised so that
    every code fits a byte and every base an int16; base [B, H, 1, D] int16 = floor(min_c / step);
    codes [B, H, n, D] uint8 = round(x / step) - base. Reconstruction: (codes + base) * step, within
    step / 2 (+ float rounding) of x. Unlike per-channel min-max, a wide channel gets more levels and a
    narrow one fewer (the same absolute step for all), and codes are not clipped to 2**bits levels:
    the entropy coder makes them cost what they carry."""
    xf = x.float()
    mn, mx = xf.amin(-2, keepdim=True), xf.amax(-2, keepdim=True)
    rng = mx - mn
    step = rng.pow(2).mean(-1, keepdim=True).sqrt() / ((1 << bits) - 1)
    step = torch.maximum(step, rng.amax(-1, keepdim=True) / 253)  # codes <= 254
    step = torch.maximum(step, xf.abs().amax((-2, -1), keepdim=True) / 32000).clamp_min(2.0**-14)  # int16 base
    step16 = step.clamp_max(FP16_MAX).half()
    step16 = torch.where(step16.float() < step, torch.nextafter(step16, step16.new_tensor(float("inf"))), step16)
    s = step16.float()
    base = torch.floor(mn / s)
    codes = (torch.round(xf / s) - base).clamp_(0, 255)
    return codes.to(torch.uint8), step16, base.to(torch.int16)


def grid_dequantize(codes: torch.Tensor, step: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """Inverse of `grid_quantize`: (codes + base) * step, float32."""
    return (codes.float() + base.float()) * step.float()


def cold_state(layer_tensors: dict[str, torch.Tensor], device: QuantConfig, cold: QuantConfig, layer_idx: int,
               head_dim: int, *, start: int = 0, position: int | None = None,
               rope: Rope | None = None, key_exps: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """The sealed region `layer_tensors` (device format, names as in `QuantizedKVLayer.sealed`, sinks
    ignored) in the cold format.

    `start`: offset of these tokens in the layer's sealed region (a multiple of the cold key group; the
    kept first tokens exist only at 0). `position`: the position of their first token (default `start`,
    i.e. no device sinks), used with `prerope` and `rope`. `key_exps` [H, D] int8: this layer's key weight
    exponents (`kvstore.quant.key_weights`), needed with `qk`."""
    check_specs(device, cold)
    if start % cold.key_group:
        raise ColdSpecError(f"start={start} must be a multiple of the cold key group {cold.key_group}")
    if cold.pre_rope and rope is None:
        raise ColdSpecError("cold prerope needs the model's RoPE (pass rope=Rope.from_model(model))")
    if cold.query_keys and key_exps is None:
        raise ColdSpecError("cold qk needs the model's key weights (kvstore.quant.key_weights.key_weights)")
    position = start if position is None else position
    dplans = _device_plans(device, layer_idx, head_dim)
    out: dict[str, torch.Tensor] = {}
    for side in "kv":
        t = _side_tensors(layer_tensors, side)
        if not t:
            continue
        if passes_through(device, cold, side, layer_idx):
            out.update({f"{side}_{n}": v for n, v in t.items()})
            continue
        x = sides.read(t, dplans[side], head_dim)  # element-wise: bit-identical however it is sliced
        n = x.shape[-2]
        if n % device.key_group:
            raise ColdSpecError(f"the region holds {n} tokens, not whole device blocks of {device.key_group}")
        keep = min(cold.sinks, n) if start == 0 else 0
        if keep:
            out[f"{side}_keep"] = x[..., :keep, :].clamp(-FP16_MAX, FP16_MAX).half()
        pieces = []
        for a, b in _groups(n, cold.key_group):
            xg = x[..., a:b, :]
            if side == "k" and cold.pre_rope:
                xg = rope.invert(xg, position + a, layer_idx)
            if a == 0 and 0 < keep < b - a:  # kept tokens must not stretch the group's ranges: fill them
                fill = xg[..., keep:keep + 1, :]  # with the first token after them
                xg = torch.cat([fill.expand(*xg.shape[:-2], keep, xg.shape[-1]), xg[..., keep:, :]], -2)
            plan = _cold_plan(cold, side, layer_idx, head_dim, b - a)
            if side == "k":
                wexp = None
                if cold.query_keys:
                    wexp = key_exps.to(torch.int8).reshape(1, -1, 1, xg.shape[-1]).expand(xg.shape[0], -1, 1, -1)
                    xg = xg * pow2(wexp)
                codes, step, base = grid_quantize(hadamard(xg) if plan.rotate else xg, plan.bits)
                pieces.append({"kc_codes": codes.transpose(-1, -2).contiguous(), "kc_step": step.transpose(-1, -2),
                               "kc_base": base.transpose(-1, -2).contiguous()})
                if wexp is not None:
                    pieces[-1]["kc_wexp"] = wexp.transpose(-1, -2).contiguous()
            else:
                pieces.append(_value_layout(sides.seal(xg, plan), plan.bits, head_dim))
        out.update(concat_cold(pieces))
    return out


def _value_layout(t: dict[str, torch.Tensor], bits: int, head_dim: int) -> dict[str, torch.Tensor]:
    """`side.seal` output of one cold group's values -> the stored layout (codes in container bits)."""
    codes = pack(unpack(t["codes"], bits, head_dim), CONTAINER_BITS[bits]) if bits == 3 else t["codes"]
    return {"vc_codes": codes, "vc_scale": t["scale"], "vc_zero": t["zero"]}


def _value_seal_format(t: dict[str, torch.Tensor], bits: int, head_dim: int) -> dict[str, torch.Tensor]:
    """Inverse of `_value_layout`: `side.seal`'s names and layout."""
    codes = pack(unpack(t["vc_codes"], CONTAINER_BITS[bits], head_dim), bits) if bits == 3 else t["vc_codes"]
    return {"codes": codes, "scale": t["vc_scale"], "zero": t["vc_zero"]}


def cold_tokens(cold_tensors: dict[str, torch.Tensor], cold: QuantConfig, layer_idx: int) -> int:
    """Tokens of the region a cold state holds."""
    for side in "kv":
        if f"{side}c_codes" in cold_tensors:
            c = cold_tensors[f"{side}c_codes"]
            return c.shape[-1] if side == "k" else c.shape[-2]
        t = _side_tensors(cold_tensors, side)
        if "codes" in t or "fp" in t:
            return t["codes" if "codes" in t else "fp"].shape[-2]
    return 0


def warm_state(cold_tensors: dict[str, torch.Tensor], device: QuantConfig, cold: QuantConfig, layer_idx: int,
               head_dim: int, *, position: int = 0, rope: Rope | None = None) -> dict[str, torch.Tensor]:
    """A cold state back in the device format (dequantize cold, re-quantize with the device plan).

    `position`: the position of the state's first token (for prerope), as given to `cold_state`."""
    check_specs(device, cold)
    if cold.pre_rope and rope is None:
        raise ColdSpecError("cold prerope needs the model's RoPE (pass rope=Rope.from_model(model))")
    dplans = _device_plans(device, layer_idx, head_dim)
    n = cold_tokens(cold_tensors, cold, layer_idx)
    out: dict[str, torch.Tensor] = {}
    for side in "kv":
        if passes_through(device, cold, side, layer_idx):
            out.update({f"{side}_{k}": v for k, v in _side_tensors(cold_tensors, side).items()})
            continue
        if f"{side}c_codes" not in cold_tensors:
            continue
        bits = cold.bits_for(layer_idx)[side == "v"]
        keep = cold_tensors.get(f"{side}_keep")
        pieces = []
        for a, b in _groups(n, cold.key_group):
            plan = _cold_plan(cold, side, layer_idx, head_dim, b - a)
            if side == "k":
                j = a // cold.key_group
                y = grid_dequantize(cold_tensors["kc_codes"][..., a:b].transpose(-1, -2),
                                    cold_tensors["kc_step"][..., j:j + 1].transpose(-1, -2),
                                    cold_tensors["kc_base"][..., j:j + 1].transpose(-1, -2))
                y = hadamard(y) if plan.rotate else y
                if "kc_wexp" in cold_tensors:
                    y = y * pow2(-cold_tensors["kc_wexp"][..., j:j + 1].transpose(-1, -2).to(torch.int32))
                if cold.pre_rope:
                    y = rope.apply(y, position + a, layer_idx)
            else:
                g = {name: cold_tensors[name][..., a:b, :] for name in ("vc_codes", "vc_scale", "vc_zero")}
                y = sides.read(_value_seal_format(g, bits, head_dim), plan, head_dim)
            if a == 0 and keep is not None:
                y = torch.cat([keep.float(), y[..., keep.shape[-2]:, :]], -2)
            pieces.append({f"{side}_{k}": v for k, v in sides.seal(y, dplans[side]).items()})
        out.update(concat_cold(pieces))  # device names all grow along dim -2
    return out


def cold_window(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """INT8 window codes as a cold session keeps them: rounded to the nearest multiple of 2**(8 - bits)
    (ties to even), clamped to ±127 so the absmax element keeps its end code; `bits` 8 returns `codes`.

    Idempotent: `cold_window(cold_window(c, b), b) == cold_window(c, b)` (a multiple of the step rounds to
    itself; ±127 rounds to ±128 and clamps back). Error: at most 2**(7 - bits) codes, times the token's scale."""
    if bits >= 8:
        return codes
    step = float(1 << (8 - bits))
    return (torch.round(codes.float() / step) * step).clamp_(-127, 127).to(torch.int8)


def cold_sinks(x: torch.Tensor) -> torch.Tensor:
    """Attention sinks as a cold session keeps them: fp32 rounded to bf16 (and held as fp32 again); 16-bit
    sinks as they are. Idempotent; relative error at most 2**-8 (bf16 keeps 8 significant bits)."""
    return x.to(torch.bfloat16).to(torch.float32) if x.dtype == torch.float32 else x


COLD_KEPT_FIELDS = ("k_sink", "v_sink", "k_win", "v_win")  # the tensors `cold_kept` may change


def cold_kept(field: str, t: torch.Tensor, cold: QuantConfig) -> torch.Tensor:
    """A sink or window tensor (`field` of COLD_KEPT_FIELDS) as a cold session keeps it: sinks through
    `cold_sinks`, INT8 window codes through `cold_window` at the spec's `cw` bits for their side; anything
    else (a 16-bit window, another field) as it is."""
    if field in ("k_sink", "v_sink"):
        return cold_sinks(t)
    if field in ("k_win", "v_win") and t.dtype == torch.int8:
        return cold_window(t, cold.cold_window_bits[field == "v_win"])
    return t


def apply_cold(cache, cold: QuantConfig, rope: Rope | None = None, key_exps: torch.Tensor | None = None) -> None:
    """Rewrite every layer of `cache` (a `QuantizedKVCache`) in place as a session resumed from the cold format
    holds it: the sealed region as `warm_state(cold_state(region))`, its sinks and window through `cold_kept`.
    Every count stays as it is. `rope` (default: the cache's) is needed for cold prerope, `key_exps`
    [L, H, D] (`kvstore.quant.key_weights.key_weights`) for cold qk."""
    device = cache.quant
    check_specs(device, cold)
    rope = rope if rope is not None else cache.rope
    if cold.pre_rope and rope is None:
        raise ColdSpecError("cold prerope needs the model's RoPE (pass rope=Rope.from_model(model))")
    if cold.layer_bits and len(cold.layer_bits) != len(cache.layers):
        raise ColdSpecError(f"the cold spec sets bits for {len(cold.layer_bits)} layers; the cache has "
                            f"{len(cache.layers)}")
    new = []
    for i, layer in enumerate(cache.layers):
        if not layer.is_initialized or layer.n_sealed == 0:
            new.append(None)
            continue
        region = {n: t for n, t in layer.sealed.items() if not n.endswith("_sink")}
        c = cold_state(region, device, cold, i, layer.head_dim, position=layer.n_sink, rope=rope,
                       key_exps=None if key_exps is None else key_exps[i])
        new.append(warm_state(c, device, cold, i, layer.head_dim, position=layer.n_sink, rope=rope))
    for layer, tensors in zip(cache.layers, new):  # only once every layer went through
        if not layer.is_initialized:
            continue
        layer.sealed.update(tensors or {})
        for name in ("k_sink", "v_sink"):
            if name in layer.sealed:
                layer.sealed[name] = cold_kept(name, layer.sealed[name], cold)
        for side in ("keys", "values"):
            window = getattr(layer, side)
            if isinstance(window, Int8Window):
                setattr(layer, side, Int8Window(cold_kept(f"{side[0]}_win", window.codes, cold), window.scale))
        layer.drop_view()  # the decode view showed the replaced tensors
