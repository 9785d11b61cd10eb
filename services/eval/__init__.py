"""Quality evaluation of KV specs against an in-process full-precision baseline (`kvstash eval ...`).

    corpus   the evaluation text and its token ids (also what the benchmarks read: services/bench)
    ppl      `eval ppl`: perplexity, KL and top-1 agreement of KV specs; the Evaluator the others share
    alloc    `eval alloc`: bits per layer and K/V under a KL budget, against flat
    cold     `eval cold`: the lossy cold mode's quality after resume against its stored bits
    plot     `eval plot`: an SVG line plot of `eval ppl --json` results; the axes (`Frame`) every plot draws
    frontier `eval plot-frontier`: specs' bits against quality as an SVG scatter plot, with the targets

Nothing here imports services/bench or services/cli; the CLI (services/cli/eval.py) builds the argparse
tree and calls each module's `run_*(args)`.
"""
