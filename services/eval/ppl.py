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
- `session`: whole-session device figures from the library's accounting (`kvstore.sizes`): `measured`, the
  state a window's cache held at its end (model dtype; mean over windows), and `bf16_2048`, the same spec on
  paper for this model in bf16 at 2,048 tokens (`planned_size`): bytes per token, bits per element, fraction
  of 16-bit KV, bytes by part (sinks, sealed, window).
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import asdict, dataclass, field

from services.eval.corpus import load_ids


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
    evicted_fraction: float = 0.0  # positions evicted at the end of a window, over the window's positions
    session: dict = field(default_factory=dict)  # {"measured": SessionSize.to_json(), "bf16_2048": ...}


PLANNED_TOKENS = 2048  # the session length of the on-paper whole-session figure (bf16 model)


def session_figures(runner, spec, states) -> dict:
    """Whole-session figures of `spec` (module docstring): the mean measured size of `states` (one per
    window) and the on-paper size at `PLANNED_TOKENS` tokens of this model in bf16."""
    from kvstore.sizes import planned_size, state_size

    sizes = [state_size(s).to_json() for s in states]
    measured = {k: sum(x[k] for x in sizes) / len(sizes) for k in sizes[0]} if sizes else {}
    planned = planned_size(spec, dataclasses.replace(runner.shape, dtype="torch.bfloat16"), PLANNED_TOKENS)
    return {"measured": measured, "bf16_2048": planned.to_json()}


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
        all_elems += 2 * b * h * layer.num_tokens * d  # per position: evicted ones count, at zero bits
        sealed = [t for n, t in tensors.items() if n[2:] in ("codes", "scale", "zero", "oidx", "oval", "fp")]
        q_bits += sum(t.untyped_storage().nbytes() * 8 for t in sealed)
        q_elems += 2 * b * h * layer.n_sealed * d
    return (q_bits / q_elems if q_elems else 0.0), (all_bits / all_elems if all_elems else 0.0)


def kl_sum(lp_ref, lp) -> float:
    """Summed KL(p_ref || p) over the rows of two [rows, vocab] log-prob tensors (negative float error clamped)."""
    return float((lp_ref.exp() * (lp_ref - lp)).sum(-1).clamp_min(0).sum())


def window_logprobs(runner, ids: list[int], cache, chunk: int):
    """Next-token log-probs [len(ids) - 1, vocab] of one window fed through `cache` in chunks."""
    import torch

    outs = []
    for start in range(0, len(ids) - 1, chunk):
        logits = runner.logits(cache, ids[start:min(start + chunk, len(ids) - 1)])
        outs.append(torch.log_softmax(logits, dim=-1))
    return torch.cat(outs)


class Evaluator:
    """Scores caches on the same windows against one full-precision reference pass (computed once)."""

    def __init__(self, runner, ids: list[int], window: int, chunk: int, progress: bool = False):
        self.runner, self.chunk, self.progress = runner, chunk, progress
        self.windows = [ids[i:i + window] for i in range(0, len(ids) - 1, window) if len(ids[i:i + window]) > 1]
        self.window = window
        self._ref = None

    def reference(self):
        """Per window: fp log-probs [n - 1, vocab] and the summed target NLL."""
        from kvstore.config import QuantConfig

        if self._ref is None:
            fp = QuantConfig.parse("fp")
            self._ref = []
            for w in self._iter(self.windows, "eval fp"):
                lp = window_logprobs(self.runner, w, self.runner.new_cache(fp), self.chunk)
                self._ref.append(lp)
        return self._ref

    def _iter(self, items, desc):
        from tqdm import tqdm

        return tqdm(items, desc=desc, disable=not self.progress, unit="window")

    def score(self, label: str, make_cache, bits=None, spec=None) -> PplResult:
        """PplResult of caches from `make_cache()` (one per window); `bits(cache)` gives the bit figures; with
        `spec` (the caches' QuantConfig) the whole-session figures too."""
        import torch

        refs = self.reference()
        nll_ref = nll = kl = agree = 0.0
        count = 0
        bits_q, bits_total, evicted, states = [], [], [], []
        for w, lp_ref in zip(self._iter(self.windows, f"eval {label}"), refs):
            targets = torch.tensor(w[1:], device=self.runner.device)
            cache = make_cache()
            lp = window_logprobs(self.runner, w, cache, self.chunk)
            rows = torch.arange(len(targets), device=self.runner.device)
            nll_ref -= float(lp_ref[rows, targets].sum())
            nll -= float(lp[rows, targets].sum())
            kl += kl_sum(lp_ref, lp)
            agree += float((lp_ref.argmax(-1) == lp.argmax(-1)).sum())
            count += len(targets)
            q, t = (bits or cache_bits)(cache)
            bits_q.append(q)
            bits_total.append(t)
            evicted.append(getattr(cache.layers[0], "n_evicted", 0) / max(1, len(w) - 1))
            if spec is not None:
                states.append(cache.export_state())
        ppl_ref, ppl = math.exp(nll_ref / count), math.exp(nll / count)
        return PplResult(spec=label, tokens=count + len(self.windows), window=self.window, ppl_ref=ppl_ref,
                         ppl=ppl, delta_ppl=ppl - ppl_ref, kl=kl / count, top1_agreement=agree / count,
                         bits_per_element=sum(bits_q) / len(bits_q),
                         bits_per_element_total=sum(bits_total) / len(bits_total),
                         evicted_fraction=sum(evicted) / len(evicted),
                         session=session_figures(self.runner, spec, states) if spec is not None else {})

    def spec(self, spec) -> PplResult:
        return self.score(spec.spec(), lambda: self.runner.new_cache(spec), spec=spec)

    def hf(self, baseline: str, spec) -> PplResult:
        """transformers' QuantizedCache (quanto or hqq backend) with `spec`'s key bits, key group and window; or
        its fp8 backend (`hf-fp8`: every element in float8 e4m3 with a per-tensor scale, no window).

        Its bits are nominal: codes plus an fp16 scale and zero per group (its internals are not ours to
        measure); the total adds the full-precision window at the model dtype's width."""
        from transformers import QuantizedCache

        backend = baseline.removeprefix("hf-")
        nbits, group, residual = spec.key_bits, spec.key_group, spec.residual
        width = self.runner.dtype.itemsize * 8

        def bits(cache):
            n = cache.get_seq_length()
            sealed = n - min(n, residual) if residual else n
            q = nbits + 32 / group
            return q, (sealed * q + (n - sealed) * width) / max(n, 1)

        if backend == "fp8":  # float8 e4m3, one scale per layer and side calibrated on the first chunk (vLLM's)
            return self.score(baseline, lambda: QuantizedCache(backend="fp8", config=self.runner.model.config),
                              lambda cache: (8.0, 8.0))
        label = f"{baseline}:int{nbits}:g{group}:r{residual}"
        return self.score(label, lambda: QuantizedCache(backend=backend, config=self.runner.model.config, nbits=nbits,
                                                        q_group_size=group, residual_length=residual), bits)


def evaluate_ppl(runner, ids: list[int], spec, window: int, chunk: int, progress: bool = False) -> PplResult:
    return Evaluator(runner, ids, window, chunk, progress).spec(spec)


def load_runner(args):
    from services.config import ModelConfig
    from services.worker.model_runner import ModelRunner

    if args.chunk < 1 or args.window < 2 or args.tokens < 2:
        raise SystemExit("--chunk must be >= 1, --window and --tokens >= 2")
    return ModelRunner.from_config(ModelConfig(name=args.model, dtype=args.dtype))


def print_results(results: list[PplResult], as_json: bool, header: str) -> None:
    if as_json:
        for r in results:
            print(json.dumps(asdict(r)))
        return
    print(header)
    print("| kv | ppl | ΔPPL | mean KL | top-1 agree | bits/elem (quantized) | bits/elem (total) "
          f"| whole session, bf16 at {PLANNED_TOKENS}: bits/elem | B/token | × of 16-bit KV |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    print(f"| fp (reference) | {results[0].ppl_ref:.3f} | 0 | 0 | 1 | - | - | 16 | - | 1 |")
    for r in results:
        p = r.session.get("bf16_2048")
        whole = (f"{p['bits_per_element']:.3f} | {p['bytes_per_token']:.0f} | {p['fraction_of_16bit']:.3f}" if p
                 else "- | - | -")
        print(f"| `{r.spec}` | {r.ppl:.3f} | {r.delta_ppl:+.3f} | {r.kl:.5f} | {r.top1_agreement:.4f} "
              f"| {r.bits_per_element:.3f} | {r.bits_per_element_total:.3f} | {whole} |")


def run_ppl(args) -> int:
    from kvstore.config import QuantConfig

    specs = [QuantConfig.from_spec_or_file(s) for s in args.kv.split(",")]
    runner = load_runner(args)
    ev = Evaluator(runner, load_ids(runner, args.text, args.tokens), args.window, args.chunk, progress=not args.json)
    results = [ev.spec(s) for s in specs] + [ev.hf(b, specs[0]) for b in args.baseline]
    print_results(results, args.json, f"model {args.model}, {results[0].tokens} tokens in windows of "
                                      f"{args.window}, chunk {args.chunk}")
    return 0
