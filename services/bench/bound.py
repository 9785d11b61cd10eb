"""`kvstash bench bound`: the most a server could gain from concurrency on this machine, from the model's
own dense passes — what a throughput ratio target should be weighed against.

    kvstash bench bound [--model M] [--dtype D] [--sessions 16] [--prompt-tokens 64] [--new-tokens 32]
                        [--pack 512] [--linears torch|prepacked] [--reps 3] [--json]

Times plain transformers forward passes with no KV cache and no kvstash code (median of `--reps` after one
warm-up each; `--linears prepacked`: the linear layers prepacked as a worker runs them,
services/worker/prepacked_linear.py): one decode row `[1, 1]`, a batched decode pass `[S, 1]`, one prompt `[1, P]`, and a packed
prefill pass `[1, pack]`. Then takes the lockstep workload of `kvstash bench batch` (each session sends a
P-token prompt and takes N tokens, all S sessions at once) and computes:
- one session, the best any server does: N tokens per `t[1,P] + N * t[1,1]`;
- S sessions, the best any server does: S * N tokens per `S * P * t[1,pack] / pack + N * t[S,1]` (every
  prompt packed at the packed pass's cost per token, every decode step in one S-row pass);
- `bound` = their ratio: no server built on these kernels gains more from S sessions on this workload.
It is an upper bound: it charges no attention over a growing context, no sampling, no scheduling.
"""

from __future__ import annotations

import json
import statistics
import time


def pass_seconds(model, rows: int, cols: int, reps: int) -> float:
    """Median seconds of a `[rows, cols]` forward pass (random tokens, no cache, last logits only)."""
    import torch

    ids = torch.randint(1000, 20000, (rows, cols), generator=torch.Generator().manual_seed(rows * 7919 + cols))
    times = []
    with torch.inference_mode():
        for i in range(reps + 1):
            t0 = time.perf_counter()
            model(input_ids=ids.to(model.device), use_cache=False, logits_to_keep=1)
            if i:  # the first is a warm-up
                times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bound(t: dict[str, float], sessions: int, prompt: int, new: int, pack: int) -> dict[str, float]:
    """Best tokens/s alone and with `sessions` at once, and their ratio, from the pass times `t`
    (keys "decode1", "decodeS", "prompt", "packed")."""
    one = new / (t["prompt"] + new * t["decode1"])
    many = sessions * new / (sessions * prompt * t["packed"] / pack + new * t["decodeS"])
    return {"one_tokens_per_s": one, "many_tokens_per_s": many, "bound": many / one}


def run_bound(args) -> int:
    import torch
    from transformers import AutoModelForCausalLM

    from services.worker.model_store import store_for

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(store_for().resolve(args.model), dtype=getattr(torch, args.dtype))
    model.eval()
    if args.linears == "prepacked":  # as a worker runs them (services/worker/prepacked_linear.py)
        from services.worker.prepacked_linear import can_prepack, prepack_linears

        if not can_prepack(model):
            raise SystemExit(f"{args.dtype} linear layers are not prepacked on this machine")
        prepack_linears(model)
    s, p, n, pack = args.sessions, args.prompt_tokens, args.new_tokens, args.pack
    t = {"decode1": pass_seconds(model, 1, 1, args.reps), "decodeS": pass_seconds(model, s, 1, args.reps),
         "prompt": pass_seconds(model, 1, p, args.reps), "packed": pass_seconds(model, 1, pack, args.reps)}
    row = {"dtype": args.dtype, "linears": args.linears, "sessions": s, "prompt_tokens": p, "new_tokens": n, "pack": pack,
           **{f"t_{k}_s": v for k, v in t.items()}, **bound(t, s, p, n, pack)}
    if args.json:
        print(json.dumps(row, indent=1))
        return 0
    print(f"[1,1] {t['decode1'] * 1e3:.1f} ms  [{s},1] {t['decodeS'] * 1e3:.1f} ms  [1,{p}] {t['prompt'] * 1e3:.1f} ms  "
          f"[1,{pack}] {t['packed'] * 1e3:.1f} ms")
    print(f"best alone {row['one_tokens_per_s']:.1f} tokens/s, best with {s} sessions {row['many_tokens_per_s']:.1f} "
          f"tokens/s: at most {row['bound']:.2f}x")
    return 0
