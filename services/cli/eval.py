"""`kvstash eval ppl`: quality of a KV spec against a full-precision cache, same tokens, same run.

    kvstash eval ppl --model M --text FILE --kv SPEC [--tokens 4096] [--window 1024] [--chunk 32] [--json]

The first `--tokens` tokens of the text are cut into windows of `--window` tokens. Each window is fed
through a fresh cache in chunks of `--chunk` tokens (as a serving session would: earlier chunks are read
back from the cache, so quantization error propagates as in decoding), once with the `fp` cache and
once with SPEC. Reported:
- `ppl_ref`, `ppl`, `delta_ppl`: perplexity of the next-token predictions, fp cache vs SPEC;
- `kl`: mean KL(p_ref || p_spec) of next-token distributions; `top1_agreement`: argmax agreement;
- `bits_per_element`: bits of the sealed (quantized) region per K/V element: codes, scales, zeros, outliers;
- `bits_per_element_total`: bits of the whole cache (window and all) per K/V element at window length.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

DEFAULT_TEXT = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "wiki.test.raw"


def add_eval_parser(sub) -> None:
    ev = sub.add_parser("eval", help="quality evaluations against an in-process full-precision baseline")
    kinds = ev.add_subparsers(dest="eval_cmd", required=True)
    p = kinds.add_parser("ppl", help="perplexity, KL and top-1 agreement of a KV spec vs the fp cache")
    p.add_argument("--model", default="smollm2-135m-instruct", help="built-in name, HF folder or hub id")
    p.add_argument("--text", default=str(DEFAULT_TEXT), help="UTF-8 text file (default: WikiText-2 raw test)")
    p.add_argument("--kv", required=True, help="KV spec, e.g. int4, int4:k8v4:g32:r128")
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--window", type=int, default=1024)
    p.add_argument("--chunk", type=int, default=32, help="tokens per forward pass")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(fn=run_eval)


@dataclass
class PplResult:
    spec: str
    tokens: int
    window: int
    ppl_ref: float
    ppl: float
    delta_ppl: float
    kl: float
    top1_agreement: float
    bits_per_element: float
    bits_per_element_total: float


def cache_bits(cache) -> tuple[float, float]:
    """(bits per sealed element, bits per element of the whole cache), measured from tensor storages.

    The sealed region is everything quantized: codes, fp16 scales and zeros, outlier side tables (a
    side a per-layer spec keeps at 16 bits counts at its dtype's size). The whole cache adds sinks and
    the full-precision window."""
    q_bits = q_elems = all_bits = all_elems = 0
    for layer in cache.layers:
        if not layer.is_initialized:
            continue
        b, h, _, d = layer.keys.shape
        tensors = layer.tensors()
        all_bits += sum(t.untyped_storage().nbytes() * 8 for t in tensors.values())
        all_elems += 2 * b * h * layer.num_tokens * d
        sealed = [t for n, t in tensors.items() if n[2:] in ("codes", "scale", "zero", "oidx", "oval", "fp")]
        q_bits += sum(t.untyped_storage().nbytes() * 8 for t in sealed)
        q_elems += 2 * b * h * layer.n_sealed * d
    return (q_bits / q_elems if q_elems else 0.0), (all_bits / all_elems if all_elems else 0.0)


def window_logprobs(runner, ids: list[int], spec, chunk: int):
    """Next-token log-probs [len(ids) - 1, vocab] of one window through a fresh cache, and the cache."""
    import torch

    cache = runner.new_cache(spec)
    outs = []
    for start in range(0, len(ids) - 1, chunk):
        logits = runner.logits(cache, ids[start:min(start + chunk, len(ids) - 1)])
        outs.append(torch.log_softmax(logits, dim=-1))
    return torch.cat(outs), cache


def evaluate_ppl(runner, ids: list[int], spec, window: int, chunk: int, progress: bool = False) -> PplResult:
    import torch
    from tqdm import tqdm

    from kvstore.config import QuantConfig

    ref_spec = QuantConfig.parse("fp")
    nll_ref = nll = kl = agree = 0.0
    count = 0
    bits_q, bits_total = [], []
    windows = [ids[i:i + window] for i in range(0, len(ids) - 1, window) if len(ids[i:i + window]) > 1]
    for w in tqdm(windows, desc=f"eval {spec.spec()}", disable=not progress, unit="window"):
        targets = torch.tensor(w[1:], device=runner.device)
        lp_ref, _ = window_logprobs(runner, w, ref_spec, chunk)
        lp, cache = window_logprobs(runner, w, spec, chunk)
        rows = torch.arange(len(targets), device=runner.device)
        nll_ref -= float(lp_ref[rows, targets].sum())
        nll -= float(lp[rows, targets].sum())
        kl += float((lp_ref.exp() * (lp_ref - lp)).sum(-1).clamp_min(0).sum())
        agree += float((lp_ref.argmax(-1) == lp.argmax(-1)).sum())
        count += len(targets)
        q, t = cache_bits(cache)
        bits_q.append(q)
        bits_total.append(t)
    ppl_ref, ppl = math.exp(nll_ref / count), math.exp(nll / count)
    return PplResult(spec=spec.spec(), tokens=count + len(windows), window=window, ppl_ref=ppl_ref, ppl=ppl,
                     delta_ppl=ppl - ppl_ref, kl=kl / count, top1_agreement=agree / count,
                     bits_per_element=sum(bits_q) / len(bits_q), bits_per_element_total=sum(bits_total) / len(bits_total))


def run_eval(args) -> int:
    from kvstore.config import QuantConfig
    from services.config import ModelConfig
    from services.worker.model_runner import ModelRunner

    spec = QuantConfig.parse(args.kv)
    if args.chunk < 1 or args.window < 2 or args.tokens < 2:
        raise SystemExit("--chunk must be >= 1, --window and --tokens >= 2")
    runner = ModelRunner.load(ModelConfig(name=args.model, dtype=args.dtype))
    text = Path(args.text).read_text(encoding="utf-8")
    ids = runner.tokenizer(text[: args.tokens * 16], add_special_tokens=False)["input_ids"][: args.tokens]
    if len(ids) < args.tokens:
        raise SystemExit(f"{args.text} has only {len(ids)} tokens, fewer than --tokens {args.tokens}")
    res = evaluate_ppl(runner, ids, spec, args.window, args.chunk, progress=not args.json)
    if args.json:
        print(json.dumps(asdict(res)))
    else:
        print(f"model {args.model}, {res.tokens} tokens in windows of {res.window}, chunk {args.chunk}")
        print("| kv | ppl | ΔPPL | mean KL | top-1 agree | bits/elem (quantized) | bits/elem (total) |")
        print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
        print(f"| fp (reference) | {res.ppl_ref:.3f} | 0 | 0 | 1 | - | - |")
        print(f"| `{res.spec}` | {res.ppl:.3f} | {res.delta_ppl:+.3f} | {res.kl:.5f} | {res.top1_agreement:.4f} "
              f"| {res.bits_per_element:.3f} | {res.bits_per_element_total:.3f} |")
    return 0
