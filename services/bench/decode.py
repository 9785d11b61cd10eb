"""`kvstash bench decode`: a decode step at a long context, kvstash's quantized cache against transformers' fp
`DynamicCache`, in the same process; one session, or a batched pass of several.

    kvstash bench decode [--model M] [--context 512,2048] [--kv SPEC] [--rows 1,16] [--steps 16] [--reps 5]
                         [--json]

For each context length L and row count R: R sessions (different tokens each) are prefilled with L tokens
(passes of 512), then take `--steps` decode steps; the caches alternate rep by rep so that a shared
machine's slow spells weigh on all alike. Reported: median seconds per step for each and their ratio
(`ratio_vs_dynamic` = kvstash / DynamicCache; issue target <= 1.3 at 2,048 tokens with the default spec,
one session).
- R = 1: the session's own pass, as the worker runs it alone (the sealed region and window read through
  the decode view).
- R >= 2: kvstash runs one [R, 1] pass over R caches (`forward_rows`, as the worker's batched decode does:
  row-wise ops batched, attention per session); the baseline is one `DynamicCache` holding the R sessions
  as a batch of R equal-length rows (transformers' plain batched decode: one attention call for all rows,
  which kvstash cannot use without losing batch invariance). `per_row_s` = step / R.
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
    specs = args.kv.split(",")

    def run(cache, ids: list[list[int]]) -> None:
        with torch.inference_mode(), attention.active(cache):
            runner.model(input_ids=torch.tensor(ids), past_key_values=cache, use_cache=True, logits_to_keep=1)

    rows = []
    for length in (int(x) for x in args.context.split(",")):
        for n_rows in (int(x) for x in str(args.rows).split(",")):
            ids = [[rng.randrange(1000, 20000) for _ in range(length)] for _ in range(n_rows)]
            caches: dict[str, list] = {spec: [runner.new_cache(QuantConfig.parse(spec)) for _ in ids] for spec in specs}
            caches["dynamic"] = [DynamicCache()]
            for name, group in caches.items():
                for s in range(0, length, 512):
                    if name == "dynamic":
                        run(group[0], [seq[s:s + 512] for seq in ids])
                    else:
                        for cache, seq in zip(group, ids):
                            run(cache, [seq[s:s + 512]])

            def step(name: str, token: int, group: list, n: int = n_rows) -> None:
                if name == "dynamic":
                    run(group[0], [[token]] * n)
                elif n == 1:
                    run(group[0], [[token]])
                else:
                    runner.forward_rows([(c, token) for c in group], n)

            times: dict[str, list[float]] = {name: [] for name in caches}
            for rep in range(args.reps + 1):  # the first rep warms up
                for name, group in caches.items():
                    t0 = time.perf_counter()
                    for i in range(args.steps):
                        step(name, 1000 + i, group)
                    if rep:
                        times[name].append((time.perf_counter() - t0) / args.steps)
            dyn = statistics.median(times["dynamic"])
            for spec in specs:
                t = statistics.median(times[spec])
                rows.append({"context": length, "rows": n_rows, "kv": spec, "step_s": t, "per_row_s": t / n_rows,
                             "dynamic_step_s": dyn, "ratio_vs_dynamic": t / dyn})
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    print("| context | rows | kv | step s | DynamicCache step s | ratio |")
    print("| ---: | ---: | --- | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r['context']} | {r['rows']} | `{r['kv']}` | {r['step_s']:.4f} | {r['dynamic_step_s']:.4f} "
              f"| {r['ratio_vs_dynamic']:.2f}x |")
    return 0
