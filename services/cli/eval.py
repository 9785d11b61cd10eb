"""The `kvstash eval` argparse tree: quality evaluations (services/eval), each command a `run_*(args)` there.

    kvstash eval ppl --kv SPEC[,SPEC...] [--baseline hf-quanto] ...   (services/eval/ppl.py)
    kvstash eval alloc --kl-budget 0.02 [--bits 2,3,4,8] ...          (services/eval/alloc.py)
    kvstash eval cold [--kv SPEC] [--cold SPEC] ...                   (services/eval/cold.py)
    kvstash eval plot RESULTS.jsonl ... --out plot.svg                (services/eval/plot.py)
    kvstash eval plot-frontier RESULTS.jsonl ... --out frontier.svg   (services/eval/frontier.py)
"""

from __future__ import annotations

from services.cli.commands import runs
from services.config import DEFAULT_KV_SPEC
from services.eval.corpus import DEFAULT_TEXT

# `eval cold`'s defaults (kept here, not in services/eval/cold.py, so that building the tree imports no numpy)
DEFAULT_DEVICE = DEFAULT_KV_SPEC
# SmolLM2-135M-Instruct (30 layers) on the default device spec: keys 2-4 bits and values 2-3 bits per layer,
# allocated from `eval cold --sensitivity`, keys weighted by the model's query energy (qk), clipped rotated
# values, the stored window at 5/4 bits: delta PPL +0.43 over 3 windows, a whole 2,048-token session 0.148x of
# 16-bit (docs/BENCHMARKS.md, "Cold mode v3"). The flat `int:k3v2:g128:gv64:s1:hadv:clipv:qk:cw43` fits any
# model with q projections (+0.68).
DEFAULT_COLD = "int:g128:gv64:s1:hadv:clipv:lb222222323232224232322222222232322243422243323243332232222222:qk:cw54"


def add_eval_parser(sub) -> None:
    ev = sub.add_parser("eval", help="quality evaluations against an in-process full-precision baseline")
    kinds = ev.add_subparsers(dest="eval_cmd", required=True)

    p = kinds.add_parser("ppl", help="perplexity, KL and top-1 agreement of KV specs vs the fp cache")
    _common(p)
    p.add_argument("--kv", required=True,
                   help="KV spec, e.g. int4:k8v4:g32:r128, or a spec file; comma-separate several to compare")
    p.add_argument("--baseline", action="append", default=[], choices=["hf-quanto", "hf-hqq", "hf-fp8"],
                   help="also run transformers' QuantizedCache with the first spec's bits, group and window")
    p.set_defaults(fn=runs("services.eval.ppl", "run_ppl"))

    p = kinds.add_parser("alloc", help="pick bits per layer and K/V under a KL budget; compare with flat")
    _common(p)
    p.add_argument("--kl-budget", default="0.02", help="mean KL(p_fp || p_kv) allowed; comma-separate several")
    p.add_argument("--bits", default="2,3,4,8", help="bit widths to choose from")
    p.add_argument("--base", default="int4:g32:gv32:r128", help="spec whose groups, window and options are kept")
    p.add_argument("--out", default="", help="write the adaptive spec to this file")
    p.set_defaults(fn=runs("services.eval.alloc", "run_alloc"), tokens=1024)

    p = kinds.add_parser("cold", help="lossy cold mode: delta PPL and KL after resume vs bits per sealed element")
    _common(p)
    p.add_argument("--kv", default=DEFAULT_DEVICE, help="device KV spec (or spec file) the history is prefilled with")
    p.add_argument("--cold", default=DEFAULT_COLD,
                   help="cold spec(s), comma-separated (grammar: kvstore/quant/cold.py)")
    p.add_argument("--history", type=int, default=2048, help="tokens prefilled before the session goes cold")
    p.add_argument("--continuation", type=int, default=512, help="tokens fed and scored after resume")
    p.add_argument("--windows", type=int, default=3, help="non-overlapping windows of history + continuation")
    p.add_argument("--prefill-chunk", type=int, default=512, help="tokens per prefill pass")
    p.add_argument("--offset", type=int, default=0, help="tokens of the text skipped before the first window "
                                                        "(e.g. to score windows held out from a calibration)")
    p.add_argument("--sensitivity", action="store_true",
                   help="scan KL per layer, side and bits with only that side cold (for allocating lb)")
    p.set_defaults(fn=runs("services.eval.cold", "run_cold"))

    p = kinds.add_parser("plot", help="SVG line plot of `eval ppl --json` result files")
    p.add_argument("files", nargs="+", help="JSON-lines files, one series each")
    p.add_argument("--x", default="evicted_fraction")
    p.add_argument("--y", default="delta_ppl")
    p.add_argument("--title", default="")
    p.add_argument("--out", required=True)
    p.set_defaults(fn=runs("services.eval.plot", "run_plot"))

    p = kinds.add_parser("plot-frontier", help="SVG scatter plot of specs' bits against quality, with targets")
    p.add_argument("files", nargs="+", help="`eval ppl --json` JSON-lines files, one colour each")
    p.add_argument("--x", default="bits_per_element", help="row field; dotted for nested (session.bf16_2048.bytes_per_token)")
    p.add_argument("--y", default="delta_ppl", help="row field (log scale unless --linear-y)")
    p.add_argument("--xlabel", default="", help="x axis title (default: the field's name)")
    p.add_argument("--ylabel", default="", help="y axis title (default: the field's name)")
    p.add_argument("--linear-y", action="store_true", help="linear y axis (e.g. when some y <= 0)")
    p.add_argument("--target", action="append", default=[],
                   help="NAME:X:Y, a bound 'x <= X at y <= Y' drawn as a region; repeat for several")
    p.add_argument("--mark", default=DEFAULT_KV_SPEC, help="spec whose point is ringed (default: the default spec)")
    p.add_argument("--title", default="")
    p.add_argument("--out", required=True)
    p.set_defaults(fn=runs("services.eval.frontier", "run_plot_frontier"))


def _common(p) -> None:
    """The flags every model evaluation takes: model, text, token budget, windows, chunk, dtype, output."""
    p.add_argument("--model", default="smollm2-135m-instruct", help="built-in name, HF folder or hub id")
    p.add_argument("--text", default=str(DEFAULT_TEXT), help="UTF-8 text file (default: WikiText-2 raw test)")
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--window", type=int, default=1024)
    p.add_argument("--chunk", type=int, default=32, help="tokens per forward pass")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--json", action="store_true", help="print one JSON object per evaluated cache")
