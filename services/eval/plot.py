"""`kvstash eval plot`: a dependency-free SVG line plot of `eval ppl --json` results.

    kvstash eval plot RESULTS.jsonl [MORE.jsonl ...] --x evicted_fraction --y delta_ppl --out plot.svg

Each input file is one series (named after the file stem), its points sorted by x. The SVG is plain text,
so plots live in the repository next to the numbers they show (docs/BENCHMARKS.md).
"""

from __future__ import annotations

import json
from html import escape
from pathlib import Path

W, H, PAD = 640, 400, 60
COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e")


def _ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    return [lo + (hi - lo) * i / n for i in range(n + 1)]


def svg(series: dict[str, list[tuple[float, float]]], xlabel: str, ylabel: str, title: str) -> str:
    pts = [p for s in series.values() for p in s]
    x0, x1 = min(p[0] for p in pts), max(p[0] for p in pts)
    y0, y1 = min(0.0, min(p[1] for p in pts)), max(p[1] for p in pts)
    x1, y1 = (x1 if x1 > x0 else x0 + 1), (y1 if y1 > y0 else y0 + 1)
    sx = lambda x: PAD + (x - x0) / (x1 - x0) * (W - 2 * PAD)  # noqa: E731
    sy = lambda y: H - PAD - (y - y0) / (y1 - y0) * (H - 2 * PAD)  # noqa: E731
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif" font-size="12">',
           f'<rect width="{W}" height="{H}" fill="white"/>',
           f'<text x="{W / 2}" y="20" text-anchor="middle" font-size="14">{escape(title)}</text>',
           f'<line x1="{PAD}" y1="{H - PAD}" x2="{W - PAD}" y2="{H - PAD}" stroke="black"/>',
           f'<line x1="{PAD}" y1="{PAD}" x2="{PAD}" y2="{H - PAD}" stroke="black"/>',
           f'<text x="{W / 2}" y="{H - 15}" text-anchor="middle">{escape(xlabel)}</text>',
           f'<text x="15" y="{H / 2}" text-anchor="middle" transform="rotate(-90 15 {H / 2})">{escape(ylabel)}</text>']
    for t in _ticks(x0, x1):
        out.append(f'<text x="{sx(t):.1f}" y="{H - PAD + 16}" text-anchor="middle">{t:.3g}</text>')
    for t in _ticks(y0, y1):
        out.append(f'<line x1="{PAD}" y1="{sy(t):.1f}" x2="{W - PAD}" y2="{sy(t):.1f}" stroke="#ddd"/>')
        out.append(f'<text x="{PAD - 6}" y="{sy(t) + 4:.1f}" text-anchor="end">{t:.3g}</text>')
    for i, (name, s) in enumerate(series.items()):
        c = COLORS[i % len(COLORS)]
        path = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in sorted(s))
        out.append(f'<polyline points="{path}" fill="none" stroke="{c}" stroke-width="2"/>')
        out += [f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="3.5" fill="{c}"/>' for x, y in s]
        out.append(f'<text x="{W - PAD - 4}" y="{PAD + 16 * i}" text-anchor="end" fill="{c}">{escape(name)}</text>')
    out.append("</svg>")
    return "\n".join(out) + "\n"


def run_plot(args) -> int:
    series = {}
    for f in args.files:
        rows = [json.loads(line) for line in Path(f).read_text(encoding="utf-8").splitlines() if line.strip()]
        series[Path(f).stem] = [(float(r[args.x]), float(r[args.y])) for r in rows]
    Path(args.out).write_text(svg(series, args.x, args.y, args.title), encoding="utf-8")
    return 0
