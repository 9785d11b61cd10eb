"""`kvstash eval alloc`: quality-adaptive bits per layer and per K/V under a KL budget, against flat.

    kvstash eval alloc --kl-budget 0.02 [--bits 2,3,4,8] [--base SPEC] [--out FILE] [--tokens N] ...

1. Sensitivity: for every layer l, side s (K or V) and bit width b, the mean KL of next-token
   distributions (vs the fp cache) when only (l, s) is quantized at b bits and everything else stays
   full precision; measured with one forward pass per window (fast; the cache quantizes what it seals).
2. Allocation: assuming KL adds up over (l, s), start everything at the fewest bits and greedily upgrade
   the (l, s) with the best KL saved per extra bit until the estimate is within the budget.
3. Verification: the allocation is evaluated for real (chunked, as `eval ppl`). The additive estimate
   is rescaled by budget / measured KL and step 2 repeats (at most 4 times), tightening when over the
   budget and relaxing when well under it; the cheapest verified allocation within the budget wins.
4. Flat: every (key bits, value bits) pair is evaluated the same way; the cheapest one within the budget
   is the flat allocation at the same budget. Both are reported with measured bits per element.
`--out` writes the adaptive spec to a file that `--kv FILE` (eval ppl, `kv.spec`) accepts.
"""

from __future__ import annotations

import itertools
import json
from dataclasses import asdict


def side_cost(base, side: str, bits: int, head_dim: int) -> float:
    """Nominal bits per element of one side: codes plus fp16 scale and zero per group."""
    group = base.key_group if side == "k" else min(base.value_group, head_dim)
    return bits + (32 / group if bits < 16 else 0)


def greedy(sens: dict, layers: int, choices: list[int], cost, target: float) -> tuple[tuple[int, int], ...]:
    """Cheapest-first allocation: sens[(l, s, b)] is the KL of quantizing (l, s) alone at b bits (0 at 16).

    Returns layer_bits [(k, v)] * layers whose summed KL estimate is <= target (or the top choice everywhere)."""
    choices = sorted(choices)
    level = {(l, s): 0 for l in range(layers) for s in "kv"}
    kl = lambda l, s, i: sens.get((l, s, choices[i]), 0.0)  # noqa: E731
    estimate = lambda: sum(kl(l, s, i) for (l, s), i in level.items())  # noqa: E731
    while estimate() > target:
        best, gain = None, -1.0
        for (l, s), i in level.items():
            if i + 1 < len(choices):
                g = (kl(l, s, i) - kl(l, s, i + 1)) / max(cost(s, choices[i + 1]) - cost(s, choices[i]), 1e-9)
                if g > gain:
                    best, gain = (l, s), g
        if best is None or gain <= 0:
            break
        level[best] += 1
    return tuple((choices[level[(l, "k")]], choices[level[(l, "v")]]) for l in range(layers))


def allocate(full, sens, layers, choices, cost, budget: float, spec_with, base) -> dict:
    """Adaptive (verified, rescaled estimate) and flat allocations within `budget`, as eval results."""
    target, best, tried = budget, None, set()
    for _ in range(4):
        alloc = greedy(sens, layers, choices, cost, target)
        if alloc in tried:
            break
        tried.add(alloc)
        r = full.spec(spec_with(alloc))
        if r.kl <= budget and (best is None or r.bits_per_element < best.bits_per_element):
            best = r
        target *= budget / max(r.kl, 1e-12)
    flat = None
    for k, v in sorted(itertools.product(choices, choices), key=lambda kv: cost("k", kv[0]) + cost("v", kv[1])):
        r = full.spec(base.replace(key_bits=k, value_bits=v, layer_bits=()))
        if r.kl <= budget:
            flat = r
            break
    return {"kl_budget": budget, "adaptive": asdict(best) if best else None, "flat": asdict(flat) if flat else None}


def run_alloc(args) -> int:
    from kvstore.config import QuantConfig
    from services.eval.corpus import load_ids
    from services.eval.ppl import Evaluator, load_runner

    base = QuantConfig.from_spec_or_file(args.base)
    choices = sorted({int(b) for b in args.bits.split(",")})
    runner = load_runner(args)
    ids = load_ids(runner, args.text, args.tokens)
    layers = runner.num_layers
    text = runner.model.config.get_text_config(decoder=True)
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    fast = Evaluator(runner, ids, args.window, args.window, progress=False)
    full = Evaluator(runner, ids, args.window, args.chunk, progress=False)
    progress = not args.json

    def spec_with(layer_bits):
        return base.replace(layer_bits=tuple(layer_bits))

    sens = {}
    todo = [(l, s, b) for l in range(layers) for s in "kv" for b in choices if b < 16]
    for n, (l, s, b) in enumerate(todo):
        bits = [(16, 16)] * layers
        bits[l] = (b, 16) if s == "k" else (16, b)
        sens[(l, s, b)] = fast.spec(spec_with(bits)).kl
        if progress and n % 10 == 0:
            print(f"sensitivity {n + 1}/{len(todo)}", flush=True)

    cost = lambda s, b: side_cost(base, s, b, head_dim)  # noqa: E731
    results = [allocate(full, sens, layers, choices, cost, budget, spec_with, base)
               for budget in (float(x) for x in str(args.kl_budget).split(","))]
    if args.out and results[0]["adaptive"] is not None:
        with open(args.out, "w", encoding="utf-8") as f:
            f.write(results[0]["adaptive"]["spec"] + "\n")
    if args.json:
        for out in results:
            print(json.dumps(out))
        return 0
    print(f"{len(ids)} calibration tokens (windows of {args.window}, chunk {args.chunk})")
    print("| KL budget | allocation | spec | mean KL | ΔPPL | bits/elem (sealed) | bits/elem (total) |")
    print("| ---: | --- | --- | ---: | ---: | ---: | ---: |")
    for out in results:
        for name in ("adaptive", "flat"):
            r = out[name]
            if r is None:
                print(f"| {out['kl_budget']} | {name} | none within budget | | | | |")
            else:
                print(f"| {out['kl_budget']} | {name} | `{r['spec']}` | {r['kl']:.5f} | {r['delta_ppl']:+.3f} "
                      f"| {r['bits_per_element']:.3f} | {r['bits_per_element_total']:.3f} |")
    return 0
