"""`kvstash eval plot-frontier`: the bits-quality frontier as a dependency-free SVG scatter plot.

    kvstash eval plot-frontier docs/results/frontier.jsonl docs/results/frontier_w8.jsonl ... \
        --x bits_per_element --y delta_ppl --target "INT4:4.6:0.10" --mark int:k4v3:g128:gv64:r64:w8:s4:hadv:hadattn --out docs/frontier.svg

Every row of the `eval ppl --json` files is one labelled point (its spec), coloured by file. `--x`/`--y` name a
field of the rows; a dotted name reaches into nested objects (`session.bf16_2048.bytes_per_token`), and rows
without it are left out. y is on a log scale (ΔPPL and KL span decades) unless `--linear-y`. A target
`NAME:X:Y` ("at most X at most Y", an issue's bound) is drawn as the dashed region left of X and below Y: a
point inside it meets the target. `--mark` rings the row of that spec (the default device spec).
"""

from __future__ import annotations

from dataclasses import dataclass
from html import escape
from pathlib import Path

from kvstore.config import QuantConfig, QuantConfigError
from services.eval.plot import COLORS, PAD, Frame, read_rows

WIDTH, HEIGHT = 960, 640
CHAR_W, LINE_H = 5.6, 11  # rough extent of a 10px sans-serif label, for placing labels apart
TARGET_COLORS = ("#8c564b", "#e377c2", "#7f7f7f")  # apart from the series colours (plot.COLORS)


@dataclass(frozen=True)
class FrontierPoint:
    """One evaluated cache: its spec (the label), its file (the series) and its coordinates."""

    label: str
    series: str
    x: float
    y: float


@dataclass(frozen=True)
class Target:
    """An issue's target: x at most `x` at y at most `y` (e.g. K4V2: 3.3 sealed bits at ΔPPL 0.3)."""

    name: str
    x: float
    y: float

    @classmethod
    def parse(cls, text: str) -> Target:
        try:
            name, x, y = text.rsplit(":", 2)
            return cls(name, float(x), float(y))
        except ValueError:
            raise ValueError(f"target {text!r} is not NAME:X:Y (e.g. INT4:4.6:0.10)") from None

    def holds(self, p: FrontierPoint) -> bool:
        return p.x <= self.x and p.y <= self.y


def field(row: dict, name: str) -> float | None:
    """`row[name]`, a dotted name reaching into nested objects; None where the row lacks it."""
    value = row
    for key in name.split("."):
        if not isinstance(value, dict) or key not in value:
            return None
        value = value[key]
    return float(value)


def canonical_spec(spec: str) -> str:
    """The spec as `eval ppl` labels its rows (`int4:g32` -> `int:k4v4:g32:...`); a baseline's label as given."""
    try:
        return QuantConfig.parse(spec).spec()
    except QuantConfigError:
        return spec


def load_points(files: list[str], x: str, y: str) -> list[FrontierPoint]:
    points = []
    for f in files:
        for row in read_rows(f):
            px, py = field(row, x), field(row, y)
            if px is not None and py is not None:
                points.append(FrontierPoint(row["spec"], Path(f).stem, px, py))
    if not points:
        raise ValueError(f"no row of {files} has both {x!r} and {y!r}")
    return points


def _short(label: str) -> str:
    return label.removeprefix("int:")


class _Labels:
    """Places point labels so that their (estimated) boxes overlap neither each other nor the points: the
    first free slot right of the point at its height, then one line up or down at a time, then the same left
    of it; where none is free, the slot overlapping least."""

    def __init__(self, frame: Frame, points: list[tuple[float, float]]) -> None:
        self.frame = frame
        self.boxes = [(x - 4, y - 4, x + 4, y + 4) for x, y in points]

    def place(self, cx: float, cy: float, text: str) -> tuple[float, float, str]:
        w = CHAR_W * len(text)
        shifts = [0] + [d for k in range(1, 7) for d in (-k, k)]
        slots = [(cx + 10, cy + 4 + d * LINE_H, "start") for d in shifts]
        slots += [(cx - 10, cy + 4 + d * LINE_H, "end") for d in shifts]

        def box(slot):
            x, y, anchor = slot
            left = x if anchor == "start" else x - w
            return (left, y - LINE_H + 2, left + w, y + 2)

        def cost(slot):
            b = box(slot)
            outside = b[0] < PAD or b[2] > self.frame.width - 4 or b[1] < PAD / 2 or b[3] > self.frame.height - PAD
            return sum(_overlap(b, o) for o in self.boxes) + (100 if outside else 0)

        best = min(slots, key=cost)  # the first of the cheapest: slots are in order of preference
        self.boxes.append(box(best))
        return best


def _overlap(a, b) -> float:
    """The area two boxes (left, top, right, bottom) share."""
    return max(0.0, min(a[2], b[2]) - max(a[0], b[0])) * max(0.0, min(a[3], b[3]) - max(a[1], b[1]))


def frontier_svg(points: list[FrontierPoint], targets: list[Target], mark: str, xlabel: str, ylabel: str,
                 title: str, log_y: bool = True) -> str:
    """The scatter plot: target regions first (so points draw over them), then every point with its label,
    the marked spec's point ringed, and a legend of the series. Elements carry a `class` (target, point,
    mark, label, legend) so the plot can be read back."""
    corners = [(p.x, p.y) for p in points] + [(t.x, t.y) for t in targets]
    frame = Frame.around(corners, log_y=log_y, nice_x=True, width=WIDTH, height=HEIGHT)
    out = frame.open(xlabel, ylabel, title)
    for i, t in enumerate(targets):
        c = TARGET_COLORS[i % len(TARGET_COLORS)]
        x, y = frame.sx(t.x), frame.sy(t.y)
        out.append(f'<rect class="target" x="{PAD}" y="{y:.1f}" width="{x - PAD:.1f}" height="{HEIGHT - PAD - y:.1f}" '
                   f'fill="{c}" fill-opacity="0.07" stroke="{c}" stroke-dasharray="5,3"/>')
        out.append(f'<text class="target" x="{PAD + 4}" y="{y + 13:.1f}" fill="{c}" '
                   f'font-size="11">{escape(f"{t.name} target: ≤ {t.x:g}, ≤ {t.y:g}")}</text>')
    colors = {s: COLORS[i % len(COLORS)] for i, s in enumerate(dict.fromkeys(p.series for p in points))}
    labels = _Labels(frame, [(frame.sx(p.x), frame.sy(p.y)) for p in points])
    for p in sorted(points, key=lambda p: (p.x, -p.y)):
        cx, cy, c = frame.sx(p.x), frame.sy(p.y), colors[p.series]
        out.append(f'<circle class="point" cx="{cx:.1f}" cy="{cy:.1f}" r="3.5" fill="{c}"/>')
        text = _short(p.label) + (" (default)" if p.label == mark else "")
        if p.label == mark:
            out.append(f'<circle class="mark" cx="{cx:.1f}" cy="{cy:.1f}" r="8" fill="none" stroke="black" '
                       f'stroke-width="1.5"/>')
        lx, ly, anchor = labels.place(cx, cy, text)
        if abs(ly - 4 - cy) > LINE_H:  # moved away from its point: a leader line
            out.append(f'<line class="leader" x1="{cx:.1f}" y1="{cy:.1f}" x2="{lx:.1f}" y2="{ly - 4:.1f}" '
                       f'stroke="{c}" stroke-width="0.5"/>')
        weight = ' font-weight="bold"' if p.label == mark else ""
        out.append(f'<text class="label" x="{lx:.1f}" y="{ly:.1f}" text-anchor="{anchor}" font-size="10" '
                   f'fill="{c}"{weight}>{escape(text)}</text>')
    for i, (name, c) in enumerate(colors.items()):
        out.append(f'<text class="legend" x="{WIDTH - PAD}" y="{PAD + 16 * i}" text-anchor="end" '
                   f'fill="{c}">{escape(name)}</text>')
    out.append("</svg>")
    return "\n".join(out) + "\n"


def run_plot_frontier(args) -> int:
    points = load_points(args.files, args.x, args.y)
    targets = [Target.parse(t) for t in args.target]
    xlabel, ylabel = args.xlabel or args.x, args.ylabel or args.y
    text = frontier_svg(points, targets, canonical_spec(args.mark), xlabel, ylabel, args.title, not args.linear_y)
    Path(args.out).write_text(text, encoding="utf-8")
    return 0
