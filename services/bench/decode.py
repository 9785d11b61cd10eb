"""`kvstash bench decode`: one session's decode step at a long context, kvstash's quantized cache against
transformers' fp `DynamicCache`, in the same process.

    kvstash bench decode [--model M] [--context 512,2048] [--kv SPEC] [--steps 16] [--reps 5]
                         [--json]

For each context length L: both caches are prefilled with the same L tokens (passes of 512), then each
takes `--steps` single-token decode steps, the two alternating rep by rep so that a shared machine's slow
spells weigh on both alike. Reported: median seconds per step for each and their ratio
(`ratio_vs_dynamic` = kvstash / DynamicCache; issue target <= 1.3 at 2,048 tokens with the default spec).
The kvstash cache decodes as the worker does: the sealed region read through its decode view.
"""

from __future__ import annotations

import json
import random
import statistics
import time


def run_decode(args) -> int:
    import torch
    from transformers import DynamicCache

    from kvstore.config import QuantConfig
    from kvstore.quant import attention
    from services.config import ModelConfig
    from services.worker.model_runner import ModelRunner

    runner = ModelRunner.from_config(ModelConfig(name=args.model))
    rng = random.Random(0)
    rows = []
    for length in (int(x) for x in args.context.split(",")):
        ids = [rng.randrange(1000, 20000) for _ in range(length)]
        caches = {}
        for spec in args.kv.split(","):
            caches[spec] = runner.new_cache(QuantConfig.parse(spec))
        caches["dynamic"] = DynamicCache()
        for cache in caches.values():
            for s in range(0, length, 512):
                with torch.inference_mode(), attention.active(cache):
                    runner.model(input_ids=torch.tensor([ids[s:s + 512]]), past_key_values=cache, use_cache=True,
                                 logits_to_keep=1)
        times: dict[str, list[float]] = {name: [] for name in caches}
        for rep in range(args.reps + 1):  # the first rep warms up
            for name, cache in caches.items():
                t0 = time.perf_counter()
                for i in range(args.steps):
                    with torch.inference_mode(), attention.active(cache):
                        runner.model(input_ids=torch.tensor([[1000 + i]]), past_key_values=cache, use_cache=True,
                                     logits_to_keep=1)
                if rep:
                    times[name].append((time.perf_counter() - t0) / args.steps)
        dyn = statistics.median(times["dynamic"])
        for spec in args.kv.split(","):
            t = statistics.median(times[spec])
            rows.append({"context": length, "kv": spec, "step_s": t, "dynamic_step_s": dyn,
                         "ratio_vs_dynamic": t / dyn})
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    print("| context | kv | step s | DynamicCache step s | ratio |")
    print("| ---: | --- | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r['context']} | `{r['kv']}` | {r['step_s']:.4f} | {r['dynamic_step_s']:.4f} "
              f"| {r['ratio_vs_dynamic']:.2f}x |")
    return 0
