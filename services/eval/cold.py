"""`kvstash eval cold`: what the opt-in lossy cold mode costs in quality, and what it saves in bytes.

    kvstash eval cold --kv DEVICE_SPEC --cold COLD_SPEC[,COLD_SPEC...] [--history 2048] [--continuation 512]
                      [--windows 3] [--chunk 32] [--prefill-chunk 512] [--offset 0] [--model M] [--text FILE]
                      [--json]

The text (default WikiText-2 raw test), after `--offset` tokens, is cut into `--windows` non-overlapping
windows of history + continuation + 1 tokens. In each window the history is prefilled with the device
spec in passes of `--prefill-chunk` tokens; then the same cache is resumed twice from bit-identical copies:
- baseline: the copy as is (what a lossless offload gives back);
- cold: the copy after `kvstore.quant.cold.apply_cold(copy, cold)` (what a session resumed from the
  cold format holds: its sealed region became warm(cold(region)), fp32 sinks bf16, and an INT8 window's
  codes kept at the spec's `cw` bits).
Both are fed the continuation in chunks of `--chunk` tokens (as decoding would: the continuation is
sealed at device precision as it leaves the window) and every continuation position's next token is
scored (`continuation` targets per window, all predicted by the resumed cache). Reported per cold spec:
- `ppl_base`, `ppl`, `delta_ppl` (cold - baseline, same run, same tokens); `kl`: mean KL(p_base || p_cold)
  of the next-token distributions; `top1_agreement`;
- `bits_per_element`: bytes of the sealed region's cold tensors, coded losslessly as the service codes
  KV (`kvstore.codec.streams` transforms, `kvstore.codec.tensors` bundle, zstd level 19, all layers in
  one frame), times 8, over the sealed K/V elements (2 x heads x sealed tokens x head_dim per layer);
  `ratio_vs_fp16` = 16 / bits (`fraction_of_fp16` its inverse); `device_bits_per_element` /
  `device_ratio_vs_fp16`: the same for the device tensors of the same region (what the lossless offload
  stores). `stored_bits_per_element`: what the service stores with `tiers.cold_spec` set, the whole blocks
  of the sealed region as cold blocks (kvstore.codec.cold_block, one zstd-19 container per block, headers
  included); `stored_device_bits_per_element`: the same blocks stored losslessly (rANS-ctx). A session
  resumed from those cold blocks holds the cache scored here in every whole block (blockwise cold ==
  region-wide cold, tests/kvstore/codec/test_cold_block.py) and its tail as `ColdCodec.warm_tail` stores it;
  sealed tokens past the last whole block (none when a block is one device key group, the default) stay
  lossless in the service, so the score here is, if anything, pessimistic.
Note: the continuation is itself quantized as it is sealed, so any change to the history, however small,
flips some of its rounding decisions and the two runs drift apart: on SmolLM2, quantizing layer 0's
sealed region once more at device precision (dequantize, re-seal) already gives a KL of about 1e-3 on the
continuation. KL and delta PPL differences at that level are noise of this kind, not cold-mode loss.
`--tokens` and `--window` of the common options are not used here (windows are history + continuation).

`--sensitivity` scans instead: for every layer and side, the first `--cold` spec's knobs with only that side of
that layer cold (keys at 2, 3, 4 bits, values at 2, 3; everything else passed through), and `floor`: every
side passed through (what the sinks and window knobs alone cost). One JSON line per row with the mean KL
over the continuations; use a continuation that stays in the window (e.g. 64 tokens with r64 and g128), so
that no re-sealing drift blurs the differences. Per-layer bits (`lb`) are allocated from these rows.
"""

from __future__ import annotations

import json
import math
import sys

import numpy as np


def encoded_bits(named: list[tuple[str, np.ndarray]], device_spec: str, level: int = 19) -> int:
    """Bits of named arrays ("<layer>.<name>") coded as the service codes KV: stream transforms (keyed on
    the device spec, so device-format tensors are transformed as in an offload), tensor bundle, zstd."""
    import zstandard

    from kvstore.codec import streams
    from kvstore.codec.tensors import encode_tensors

    ctx = streams.StreamContext.of(device_spec, {n: tuple(a.shape) for n, a in named})
    raw = encode_tensors([(n, streams.forward(n, a, ctx)) for n, a in named])
    return len(zstandard.ZstdCompressor(level=level).compress(raw)) * 8


def sealed_regions(cache) -> list[tuple[int, object, dict]]:
    """(layer index, layer, sealed-region tensors without sinks) of every layer holding sealed tokens."""
    return [(i, layer, {n: t for n, t in layer.sealed.items() if not n.endswith("_sink")})
            for i, layer in enumerate(cache.layers) if layer.is_initialized and layer.n_sealed]


def region_bits(cache, cold, rope, key_exps=None) -> tuple[int, int, int]:
    """(cold bits, device bits, sealed K/V elements) of a cache's sealed region."""
    from kvstore.quant.cold import cold_state

    cold_named, dev_named, elems = [], [], 0
    for i, layer, region in sealed_regions(cache):
        c = cold_state(region, cache.quant, cold, i, layer.head_dim, position=layer.n_sink, rope=rope,
                       key_exps=None if key_exps is None else key_exps[i])
        cold_named += [(f"{i}.{n}", t.detach().contiguous().cpu().numpy()) for n, t in c.items()]
        dev_named += [(f"{i}.{n}", t.detach().contiguous().cpu().numpy()) for n, t in region.items()]
        b, h, _, d = layer.keys.shape
        elems += 2 * b * h * layer.n_sealed * d
    spec = cache.quant.spec()
    return encoded_bits(cold_named, spec), encoded_bits(dev_named, spec), elems


def stored_bits(state, runner, device, cold, prefill_chunk: int, key_exps=None) -> tuple[int, int, int]:
    """(bits as cold blocks, bits as lossless blocks, elements) of the whole blocks of `state`, cut as the
    service cuts them (its default `prefix.block_tokens` for these specs and prefill chunk)."""
    from kvstore.codec.block_codec import BlockContext
    from kvstore.codec.registry import DEFAULT, codec_named
    from kvstore.layout import ModelShape
    from kvstore.prefix import blocks as blk
    from services.config import default_block_tokens

    bt = default_block_tokens(device.key_group, cold.key_group, prefill_chunk)
    shape = ModelShape.of_state(state)
    n = blk.whole_blocks(state, bt)
    parts, _ = blk.split(state, bt, n)
    ctx = BlockContext(device, shape, bt, runner.fingerprint, None if key_exps is None else key_exps.numpy())
    cold_codec, lossless = codec_named("cold")(ctx, cold.spec()), codec_named(DEFAULT)(ctx)
    cbits = sum(len(cold_codec.encode(p, i).data) for i, p in enumerate(parts)) * 8
    dbits = sum(len(lossless.encode(p, i).data) for i, p in enumerate(parts)) * 8
    return cbits, dbits, 2 * n * bt * shape.layers * shape.kv_heads * shape.head_dim


def continuation_logprobs(runner, cache, ids: list[int], chunk: int):
    """Log-probs [len(ids), vocab] of the next token after each of `ids`, fed through `cache` in chunks."""
    import torch

    return torch.cat([torch.log_softmax(runner.logits(cache, ids[s:s + chunk]), dim=-1)
                      for s in range(0, len(ids), chunk)])


def run_cold(args) -> int:
    import torch

    from kvstore.config import QuantConfig
    from kvstore.quant.cold import apply_cold, check_specs
    from kvstore.quant.rope import Rope, RopeUnavailable
    from services.eval.corpus import load_ids
    from services.eval.ppl import kl_sum, load_runner

    torch.set_num_threads(1)
    device = QuantConfig.from_spec_or_file(args.kv)
    colds = [QuantConfig.from_spec_or_file(s) for s in args.cold.split(",")]
    for c in colds:
        check_specs(device, c)  # fail before loading anything
    if args.history < 1 or args.continuation < 1 or args.windows < 1 or args.prefill_chunk < 1 or args.offset < 0:
        raise SystemExit("--history, --continuation, --windows and --prefill-chunk must be >= 1, --offset >= 0")
    runner = load_runner(args)
    for c in colds:
        if c.layer_bits and len(c.layer_bits) != runner.num_layers:
            raise SystemExit(f"cold spec {c.spec()} sets bits for {len(c.layer_bits)} layers; {args.model} has "
                             f"{runner.num_layers}")
    rope = None
    if any(c.pre_rope for c in colds):
        try:
            rope = Rope.from_model(runner.model)
        except RopeUnavailable as e:
            raise SystemExit(f"cold prerope: {e}") from None
    key_exps = torch.from_numpy(runner.key_exps()) if any(c.query_keys for c in colds) else None
    span = args.history + args.continuation + 1
    ids = load_ids(runner, args.text, args.offset + span * args.windows)[args.offset:]
    log = (lambda *a: None) if args.json else (lambda *a: print(*a, file=sys.stderr, flush=True))

    windows = []  # (exported state after the history, continuation ids, targets, baseline log-probs)
    for w in range(args.windows):
        win = ids[w * span:(w + 1) * span]
        cache = runner.new_cache(device)
        for s in range(0, args.history, args.prefill_chunk):
            runner.logits(cache, win[s:min(s + args.prefill_chunk, args.history)], keep=1)
        state = cache.export_state()
        cont = win[args.history:args.history + args.continuation]
        targets = torch.tensor(win[args.history + 1:], device=runner.device)
        base = continuation_logprobs(runner, runner.restore_cache(state), cont, args.chunk)
        windows.append((state, cont, targets, base))
        log(f"window {w + 1}/{args.windows}: history prefilled, baseline scored")

    if args.sensitivity:
        return _sensitivity(runner, colds[0], windows, args.chunk, rope, key_exps)
    results = []
    for cold in colds:
        nll_b = nll_c = kl = agree = 0.0
        count = bits = dev_bits = elems = st_bits = st_dev = st_elems = 0
        for state, cont, targets, lp_b in windows:
            cache = runner.restore_cache(state)
            cb, db, n = region_bits(cache, cold, rope, key_exps)
            bits, dev_bits, elems = bits + cb, dev_bits + db, elems + n
            if not cold.pre_rope:
                sb, sd, se = stored_bits(state, runner, device, cold, args.prefill_chunk, key_exps)
                st_bits, st_dev, st_elems = st_bits + sb, st_dev + sd, st_elems + se
            apply_cold(cache, cold, rope=rope, key_exps=key_exps)
            lp_c = continuation_logprobs(runner, cache, cont, args.chunk)
            rows = torch.arange(len(targets), device=runner.device)
            nll_b -= float(lp_b[rows, targets].sum())
            nll_c -= float(lp_c[rows, targets].sum())
            kl += kl_sum(lp_b, lp_c)
            agree += float((lp_b.argmax(-1) == lp_c.argmax(-1)).sum())
            count += len(targets)
        ppl_b, ppl_c = math.exp(nll_b / count), math.exp(nll_c / count)
        bpe = bits / elems if elems else 0.0
        dpe = dev_bits / elems if elems else 0.0
        results.append({
            "spec": cold.spec(), "device_spec": device.spec(), "model": args.model, "windows": args.windows,
            "history": args.history, "continuation": args.continuation, "chunk": args.chunk, "offset": args.offset,
            "scored_tokens": count, "sealed_elements": elems, "ppl_base": ppl_b, "ppl": ppl_c,
            "delta_ppl": ppl_c - ppl_b, "kl": kl / count, "top1_agreement": agree / count,
            "bits_per_element": bpe, "ratio_vs_fp16": 16 / bpe if bpe else 0.0, "fraction_of_fp16": bpe / 16,
            "device_bits_per_element": dpe, "device_ratio_vs_fp16": 16 / dpe if dpe else 0.0,
            "stored_bits_per_element": st_bits / st_elems if st_elems else 0.0,
            "stored_device_bits_per_element": st_dev / st_elems if st_elems else 0.0,
        })
        log(f"{cold.spec()}: {bpe:.3f} bits/elem, delta PPL {ppl_c - ppl_b:+.3f}, KL {kl / count:.5f}")
    if args.json:
        for r in results:
            print(json.dumps(r))
        return 0
    r0 = results[0]
    print(f"model {args.model}, device `{r0['device_spec']}`: {r0['device_bits_per_element']:.3f} bits per sealed "
          f"element ({r0['device_ratio_vs_fp16']:.2f}x vs fp16, lossless streams + zstd-19); {args.windows} windows "
          f"of {args.history} history + {args.continuation} continuation tokens (chunk {args.chunk}); "
          f"baseline PPL {r0['ppl_base']:.3f}")
    print(f"stored as the service stores blocks: {r0['stored_device_bits_per_element']:.3f} bits per element "
          f"lossless (rANS-ctx blocks)")
    print("| cold spec | bits/elem (region) | stored bits/elem (cold blocks) | × vs fp16 | ΔPPL | mean KL | top-1 agree |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in results:
        print(f"| `{r['spec']}` | {r['bits_per_element']:.3f} | {r['stored_bits_per_element']:.3f} "
              f"| {r['ratio_vs_fp16']:.2f} | {r['delta_ppl']:+.3f} | {r['kl']:.5f} | {r['top1_agreement']:.4f} |")
    return 0


def _sensitivity(runner, base, windows, chunk: int, rope, key_exps) -> int:
    """`--sensitivity`: one JSON line per (layer, side, bits) cold alone, and the all-pass-through floor."""
    import torch

    from kvstore.quant.cold import apply_cold
    from services.eval.ppl import kl_sum

    def mean_kl(bits: list[tuple[int, int]]) -> float:
        passed = all(b == 16 for pair in bits for b in pair)
        cold = base.replace(layer_bits=tuple(bits), clip="" if passed else base.clip)  # clip needs a quantized side
        total = count = 0.0
        for state, cont, _, lp_b in windows:
            cache = runner.restore_cache(state)
            apply_cold(cache, cold, rope=rope, key_exps=key_exps)
            total += kl_sum(lp_b, continuation_logprobs(runner, cache, cont, chunk))
            count += len(cont)
        return total / count

    with torch.no_grad():
        layers = runner.num_layers
        print(json.dumps({"spec": base.spec(), "row": "floor", "kl": mean_kl([(16, 16)] * layers)}), flush=True)
        for layer in range(layers):
            for side, choices in (("k", (2, 3, 4)), ("v", (2, 3))):
                for b in choices:
                    bits = [(16, 16)] * layers
                    bits[layer] = (b, 16) if side == "k" else (16, b)
                    print(json.dumps({"spec": base.spec(), "layer": layer, "side": side, "bits": b,
                                      "kl": mean_kl(bits)}), flush=True)
    return 0
