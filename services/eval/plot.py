"""`kvstash eval plot`: a dependency-free SVG line plot of `eval ppl --json` results.

    kvstash eval plot RESULTS.jsonl [MORE.jsonl ...] --x evicted_fraction --y delta_ppl --out plot.svg

Each input file is one series (named after the file stem), its points sorted by x. The SVG is plain text,
so plots live in the repository next to the numbers they show (docs/BENCHMARKS.md). `Frame` (the axes, their
scales and ticks) is shared with the frontier scatter plot (services/eval/frontier.py).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from html import escape
from pathlib import Path

W, H, PAD = 640, 400, 60
COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e")


def _ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    return [lo + (hi - lo) * i / n for i in range(n + 1)]


def _nice_step(span: float, n: int = 6) -> float:
    """The round step (1, 2 or 5 times a power of ten) giving about `n` ticks over `span`."""
    unit = 10.0 ** math.floor(math.log10(span / n))
    return next(m * unit for m in (1, 2, 5, 10) if span / (m * unit) <= n)


def _label(t: float) -> str:
    return f"{t:,.0f}" if abs(t) >= 1000 else f"{t:.3g}"


@dataclass(frozen=True)
class Frame:
    """The axes of one plot: data ranges [x0, x1] x [y0, y1] mapped onto a `width` x `height` canvas inside a
    margin of PAD. With `log_y` the y axis is log10 and y0 > 0. Invariant: x1 > x0 and y1 > y0."""

    x0: float
    x1: float
    y0: float
    y1: float
    log_y: bool = False
    width: int = W
    height: int = H
    x_step: float = 0.0

    @classmethod
    def around(cls, pts: list[tuple[float, float]], log_y: bool = False, nice_x: bool = False,
               width: int = W, height: int = H) -> Frame:
        """The frame holding `pts`: x from min to max (with `nice_x` widened to round ticks, half a step
        clear of the extreme points); y from min(0, min y) to max y, or with `log_y` from the decade below
        the smallest y to the one above the largest (every y must then be > 0)."""
        xs, ys = [p[0] for p in pts], [p[1] for p in pts]
        x0, x1 = min(xs), max(xs)
        x1 = x1 if x1 > x0 else x0 + 1
        step = _nice_step(x1 - x0) if nice_x else 0.0
        if step:
            x0, x1 = math.floor(x0 / step - 0.5) * step, math.ceil(x1 / step + 0.5) * step
        if log_y:
            if min(ys) <= 0:
                raise ValueError(f"a log y axis needs every y > 0 (smallest: {min(ys)})")
            y0, y1 = 10.0 ** math.floor(math.log10(min(ys))), 10.0 ** math.ceil(math.log10(max(ys)))
            y1 = y1 if y1 > y0 else y0 * 10
        else:
            y0, y1 = min(0.0, min(ys)), max(ys)
            y1 = y1 if y1 > y0 else y0 + 1
        return cls(x0, x1, y0, y1, log_y, width, height, step)

    def sx(self, x: float) -> float:
        return PAD + (x - self.x0) / (self.x1 - self.x0) * (self.width - 2 * PAD)

    def sy(self, y: float) -> float:
        f = (math.log10(y / self.y0) / math.log10(self.y1 / self.y0) if self.log_y
             else (y - self.y0) / (self.y1 - self.y0))
        return self.height - PAD - f * (self.height - 2 * PAD)

    def x_ticks(self) -> list[float]:
        if not self.x_step:
            return _ticks(self.x0, self.x1)
        return [k * self.x_step for k in range(round(self.x0 / self.x_step), round(self.x1 / self.x_step) + 1)]

    def y_ticks(self) -> list[float]:
        if not self.log_y:
            return _ticks(self.y0, self.y1)
        decades = range(round(math.log10(self.y0)), round(math.log10(self.y1)) + 1)
        return [m * 10.0 ** d for d in decades for m in (1, 2, 5) if self.y0 <= m * 10.0 ** d <= self.y1 * 1.0001]

    def open(self, xlabel: str, ylabel: str, title: str) -> list[str]:
        """The SVG's opening lines: canvas, title, axes, axis labels, ticks and horizontal grid lines."""
        w, h = self.width, self.height
        out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" '
               f'font-size="12">',
               f'<rect width="{w}" height="{h}" fill="white"/>',
               f'<text x="{w / 2}" y="20" text-anchor="middle" font-size="14">{escape(title)}</text>',
               f'<line x1="{PAD}" y1="{h - PAD}" x2="{w - PAD}" y2="{h - PAD}" stroke="black"/>',
               f'<line x1="{PAD}" y1="{PAD}" x2="{PAD}" y2="{h - PAD}" stroke="black"/>',
               f'<text x="{w / 2}" y="{h - 15}" text-anchor="middle">{escape(xlabel)}</text>',
               f'<text x="15" y="{h / 2}" text-anchor="middle" transform="rotate(-90 15 {h / 2})">{escape(ylabel)}</text>']
        for t in self.x_ticks():
            out.append(f'<text x="{self.sx(t):.1f}" y="{h - PAD + 16}" text-anchor="middle">{_label(t)}</text>')
        for t in self.y_ticks():
            out.append(f'<line x1="{PAD}" y1="{self.sy(t):.1f}" x2="{w - PAD}" y2="{self.sy(t):.1f}" stroke="#ddd"/>')
            out.append(f'<text x="{PAD - 6}" y="{self.sy(t) + 4:.1f}" text-anchor="end">{_label(t)}</text>')
        return out


def svg(series: dict[str, list[tuple[float, float]]], xlabel: str, ylabel: str, title: str) -> str:
    frame = Frame.around([p for s in series.values() for p in s])
    out = frame.open(xlabel, ylabel, title)
    for i, (name, s) in enumerate(series.items()):
        c = COLORS[i % len(COLORS)]
        path = " ".join(f"{frame.sx(x):.1f},{frame.sy(y):.1f}" for x, y in sorted(s))
        out.append(f'<polyline points="{path}" fill="none" stroke="{c}" stroke-width="2"/>')
        out += [f'<circle cx="{frame.sx(x):.1f}" cy="{frame.sy(y):.1f}" r="3.5" fill="{c}"/>' for x, y in s]
        out.append(f'<text x="{W - PAD - 4}" y="{PAD + 16 * i}" text-anchor="end" fill="{c}">{escape(name)}</text>')
    out.append("</svg>")
    return "\n".join(out) + "\n"


def read_rows(path: str | Path) -> list[dict]:
    """The JSON objects of a JSON-lines file (`eval ppl --json` output), blank lines skipped."""
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


def run_plot(args) -> int:
    series = {Path(f).stem: [(float(r[args.x]), float(r[args.y])) for r in read_rows(f)] for f in args.files}
    Path(args.out).write_text(svg(series, args.x, args.y, args.title), encoding="utf-8")
    return 0
