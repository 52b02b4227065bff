"""SVG figures for evaluate.py: grouped bar charts with 95 % CI error bars, and few-shot curves.

Plain SVG text, written atomically (fileio.write_text), no plotting library: bars for one metric
group (e.g. alignment paired / cross / gap) across models, and mean ± std curves over the few-shot
fractions. `save_figures` draws evaluate.py's set from its models' results.json.
"""
from __future__ import annotations

import math
from html import escape

from ..fileio import write_text
from .protocol import CLS_METRICS

PALETTE = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf"]
W, H, LEFT, RIGHT, TOP, BOTTOM = 640, 360, 60, 170, 40, 50


def _ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    step = (hi - lo) / n if hi > lo else 1.0
    mag = 10 ** math.floor(math.log10(step))
    step = min((m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= step), default=step)
    start = math.floor(lo / step) * step
    return [start + i * step for i in range(int(math.ceil((hi - start) / step)) + 1)]


def _frame(title: str, ylabel: str, lo: float, hi: float):
    """(svg lines, y -> pixel) with the axes, title and y ticks drawn."""
    ticks = _ticks(lo, hi)
    lo, hi = min(lo, ticks[0]), max(hi, ticks[-1])
    to_y = lambda v: TOP + (H - TOP - BOTTOM) * (hi - v) / ((hi - lo) or 1)  # noqa: E731
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" '
           f'font-family="sans-serif" font-size="11">',
           f'<rect width="{W}" height="{H}" fill="white"/>',
           f'<text x="{W / 2}" y="20" text-anchor="middle" font-size="13">{escape(title)}</text>',
           f'<text x="14" y="{H / 2}" transform="rotate(-90 14 {H / 2})" '
           f'text-anchor="middle">{escape(ylabel)}</text>']
    for t in ticks:
        y = to_y(t)
        out.append(f'<line x1="{LEFT}" x2="{W - RIGHT}" y1="{y:.1f}" y2="{y:.1f}" stroke="#ddd"/>'
                   f'<text x="{LEFT - 4}" y="{y + 4:.1f}" text-anchor="end">{t:g}</text>')
    out.append(f'<line x1="{LEFT}" x2="{LEFT}" y1="{TOP}" y2="{H - BOTTOM}" stroke="black"/>')
    return out, to_y


def _finish(path, out: list, names, note: str):
    """Add the legend (one colour per name) and the note under the plot; write the file."""
    out += [f'<rect x="{W - RIGHT + 10}" y="{TOP + 16 * i}" width="10" height="10" '
            f'fill="{PALETTE[i % len(PALETTE)]}"/>'
            f'<text x="{W - RIGHT + 24}" y="{TOP + 16 * i + 9}">{escape(str(n))[:26]}</text>'
            for i, n in enumerate(names)]
    out += [f'<text x="{LEFT}" y="{H - 8}" font-size="9">{escape(note)}</text>', "</svg>"]
    write_text(path, "\n".join(out) + "\n")


def _range(values) -> tuple[float, float]:
    finite = [v for v in values if v is not None and math.isfinite(v)]
    lo, hi = (min(finite + [0.0]), max(finite + [0.0])) if finite else (0.0, 1.0)
    return lo, hi if hi > lo else lo + 1.0


def save_bars_svg(path, title: str, groups: list[str], series: dict, ylabel: str = "value",
                  note: str = ""):
    """Grouped bars: ``series`` = {model: [(value, low, high) or None per group]}; low/high draw a
    CI whisker when not None. ``note`` goes under the plot (e.g. the machine)."""
    vals = [x for bars in series.values() for b in bars if b for x in b]
    lo, hi = _range(vals)
    out, to_y = _frame(title, ylabel, lo, hi)
    gw = (W - LEFT - RIGHT) / max(len(groups), 1)
    bw = gw * 0.8 / max(len(series), 1)
    for g, name in enumerate(groups):
        out.append(f'<text x="{LEFT + gw * (g + 0.5):.1f}" y="{H - BOTTOM + 16}" '
                   f'text-anchor="middle">{escape(name)}</text>')
        for m, bars in enumerate(series.values()):
            if not bars[g] or bars[g][0] is None:
                continue
            v, low, high = bars[g]
            x = LEFT + gw * g + gw * 0.1 + bw * m
            y0, y1 = sorted((to_y(0.0), to_y(v)))
            out.append(f'<rect x="{x:.1f}" y="{y0:.1f}" width="{bw * 0.9:.1f}" '
                       f'height="{y1 - y0:.1f}" fill="{PALETTE[m % len(PALETTE)]}"/>')
            if low is not None and high is not None:
                cx, y_low, y_high = x + bw * 0.45, to_y(low), to_y(high)
                out.append(f'<path d="M{cx:.1f},{y_low:.1f}V{y_high:.1f}M{cx - 3:.1f},{y_low:.1f}h6'
                           f'M{cx - 3:.1f},{y_high:.1f}h6" stroke="black"/>')
    _finish(path, out, series, note)


def save_fewshot_svg(path, title: str, series: dict, ylabel: str = "value", note: str = ""):
    """Curves over fractions (log-spaced x): ``series`` = {model: [(fraction, mean, std)]};
    the std draws a whisker at each point."""
    pts = [p for s in series.values() for p in s if p[1] is not None]
    lo, hi = _range([m - (s or 0) for _, m, s in pts] + [m + (s or 0) for _, m, s in pts])
    out, to_y = _frame(title, ylabel, lo, hi)
    xs = sorted({p[0] for p in pts}) or [1.0]
    lx = [math.log10(x) for x in xs]
    span = (lx[-1] - lx[0]) or 1.0
    width = W - LEFT - RIGHT - 20
    to_x = lambda f: LEFT + 10 + width * (math.log10(f) - lx[0]) / span  # noqa: E731
    for f in xs:
        out.append(f'<text x="{to_x(f):.1f}" y="{H - BOTTOM + 16}" '
                   f'text-anchor="middle">{100 * f:g}%</text>')
    for m, points in enumerate(series.values()):
        colour = PALETTE[m % len(PALETTE)]
        good = [p for p in points if p[1] is not None]
        line = " ".join(f"{to_x(f):.1f},{to_y(v):.1f}" for f, v, _ in good)
        out.append(f'<polyline points="{line}" fill="none" stroke="{colour}" stroke-width="2"/>')
        for f, v, s in good:
            x, low, high = to_x(f), to_y(v - (s or 0)), to_y(v + (s or 0))
            out.append(f'<path d="M{x:.1f},{low:.1f}V{high:.1f}" stroke="{colour}"/>'
                       f'<circle cx="{x:.1f}" cy="{to_y(v):.1f}" r="3" fill="{colour}"/>')
    out.append(f'<text x="{(W - RIGHT + LEFT) / 2}" y="{H - BOTTOM + 32}" '
               f'text-anchor="middle">fraction of training labels</text>')
    _finish(path, out, series, note)


def bar_series(results: list, keys: list) -> dict:
    """{model: [(mean, CI low, CI high) or None per metric]}: save_bars_svg's series."""
    def bar(r, k):
        ci = r["ci"].get(k, {})
        if k not in r["metrics"]:
            return None
        return r["metrics"][k]["mean"], ci.get("low"), ci.get("high")
    return {r["row"]: [bar(r, k) for k in keys] for r in results}


def save_figures(out, results: list, labelled: bool, machine: str, bootstrap: int):
    """evaluate.py's figures in the folder `out`, from its models' results.json: alignment; with
    labels, zero-shot and linear probe bars and the two few-shot curves."""
    note = machine + ("; whiskers: 95% bootstrap CI" if bootstrap else "; no CIs (--bootstrap 0)")
    save_bars_svg(out / "alignment.svg", "alignment (test pairs)", ["paired", "cross", "gap"],
                  bar_series(results, ["paired", "cross", "gap"]), "cosine", note)
    if not labelled:
        return
    fitted = any("probe_acc" in r["metrics"] for r in results)  # not with --split all
    for prefix, title in (("zs", "zero-shot"), ("probe", "linear probe"))[:2 if fitted else 1]:
        save_bars_svg(out / f"{prefix}.svg", f"{title} (test images)",
                      ["acc", "weighted F1", "AUROC"],
                      bar_series(results, [f"{prefix}_{k}" for k in CLS_METRICS]), "score", note)
    for prefix, title in (("probe", "few-shot linear probe"), ("e2e", "end-to-end few-shot"))[:2 if fitted else 0]:
        series = {r["row"]: [(float(f), v["mean"], v["std"])
                             for f, v in r["fewshot"][f"{prefix}_acc"].items()] for r in results}
        save_fewshot_svg(out / f"fewshot_{prefix}.svg",
                         f"{title}: accuracy (mean ± std over seeds)", series, "accuracy", machine)
