"""Report figures: segmentation overlays, ROC curves and training curves, without matplotlib.

- `overlay` draws a test case in the style of the ultrasound-CLIP paper, Fig. 4: ground truth
  missed by the prediction in red, false positives in green, true positives in yellow, blended over the
  grayscale image. `save_overlay_grid` tiles several cases into one PNG, enlarged so a lesion's
  outline reads at a glance, under a colour legend, each with a caption, in natural case order
  ("4, 22, 23", not "22, 23, 4").
- `save_roc_svg` draws the ROC points of `metrics.roc_curve` (scikit-learn's convention).
- `save_training_curves` puts the training loss and the validation metric of a run's log.jsonl
  side by side; `save_curves_svg` is the plain line plot under it. Both write SVG text.

PNG goes through Pillow (a dependency of torchvision). Every file goes through clip_us/fileio.py:
a temporary file in the same folder, then os.replace, so a reader never sees half a figure.
"""
import math
import re
from xml.sax.saxutils import escape

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from .fileio import atomic_path, write_text
from .metrics import roc_auc, roc_curve
from .transform import CLIP_MEAN, CLIP_STD

# Fig. 4 colours (RGB): ground truth only (false negative), false positive, true positive.
RED, GREEN, YELLOW = (255, 0, 0), (0, 255, 0), (255, 255, 0)
OVERLAY_LEGEND = ((RED, "ground truth (missed)"), (GREEN, "false positive"),
                  (YELLOW, "true positive"))
PALETTE = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf"]


# ----------------------------------------------------------------------------- overlays

def _to_numpy(x):
    """Tensor (any device, any grad state) or array-like -> numpy array."""
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def _gray_uint8(image, mean=None, std=None):
    """Any accepted image form -> (H, W) uint8 grayscale.

    Accepts uint8 HxW or HxWx3 arrays, and float arrays/tensors [3,H,W], [H,W,3] or [H,W] in
    [0, 1]. Pass `mean`/`std` (per channel, e.g. CLIP's) to undo a normalisation first.
    """
    x = _to_numpy(image)
    if x.ndim == 3 and x.shape[0] in (1, 3) and x.shape[-1] not in (1, 3):
        x = x.transpose(1, 2, 0)  # [C, H, W] -> [H, W, C]
    if x.ndim not in (2, 3):
        raise ValueError(f"overlay: image must be HxW, HxWx3 or 3xHxW, got shape {x.shape}")
    if x.dtype == np.uint8:
        x = x.astype(np.float32) / 255.0
    elif mean is not None:
        x = x * np.asarray(std, np.float32) + np.asarray(mean, np.float32)  # broadcasts over C
    x = x.mean(axis=-1) if x.ndim == 3 else x  # [H, W, C] -> [H, W]
    return (np.clip(x, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def _mask(m, name, shape):
    m = _to_numpy(m)
    m = m.reshape(m.shape[-2:]) if m.ndim == 3 and m.shape[0] == 1 else m  # [1, H, W] -> [H, W]
    if m.shape != shape:
        raise ValueError(f"overlay: {name} mask has shape {m.shape} but the image is {shape}; "
                         "pass masks at the image's resolution")
    return m > 0  # binary: anything above zero is foreground


def overlay(image, gt, pred, mean=None, std=None, alpha=0.5):
    """Fig. 4 overlay -> PIL RGB image of the image's size.

    Ground truth not predicted (FN) is red, predicted but not ground truth (FP) green, both (TP)
    yellow; coloured pixels are `alpha`-blended over the gray image, others stay gray.
    Float images are taken as [0, 1] unless `mean`/`std` are given to undo a normalisation.
    """
    gray = _gray_uint8(image, mean, std)
    g, p = _mask(gt, "gt", gray.shape), _mask(pred, "pred", gray.shape)
    out = np.repeat(gray[..., None].astype(np.float32), 3, axis=-1)  # [H, W] -> [H, W, 3]
    for region, colour in ((g & ~p, RED), (p & ~g, GREEN), (g & p, YELLOW)):
        out[region] = (1 - alpha) * out[region] + alpha * np.asarray(colour, np.float32)
    return Image.fromarray((out + 0.5).astype(np.uint8), mode="RGB")


def _grid_item(item, mean, std):
    """(PIL image, caption) pair, or dict {image, gt, pred, label} -> (PIL image, caption)."""
    if isinstance(item, dict):
        missing = {"image", "gt", "pred"} - set(item)
        if missing:
            raise ValueError(f"save_overlay_grid: item is missing {sorted(missing)}; give "
                             "dicts with image, gt, pred (and label) or (PIL image, caption) pairs")
        return overlay(item["image"], item["gt"], item["pred"], mean, std), item.get("label", "")
    im, caption = item
    return im, caption


def natural_key(text):
    """Sort key that orders the numbers inside names by value: "case_4" before "case_22"."""
    # re.split with a group alternates text and digits, so equal positions hold equal types.
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", str(text))]


def _font(size):
    """Pillow's bundled scalable font at `size` px (Pillow >= 10.1, FreeType), else its bitmap one."""
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, ImportError, OSError):
        return ImageFont.load_default()


def _enlarge(im, min_side):
    """Nearest-neighbour enlargement by a whole factor until the longer side reaches min_side:
    mask edges stay crisp and the legend colours stay exact."""
    k = max(1, math.ceil(min_side / max(im.size)))
    return im.resize((im.width * k, im.height * k), Image.NEAREST) if k > 1 else im


def _draw_legend(draw, x, y, font, line_h):
    """The overlay colours as swatches with their meaning, in one line; returns its width."""
    x0 = x
    for colour, text in OVERLAY_LEGEND:
        draw.rectangle([x, y + 2, x + line_h - 4, y + line_h - 2], fill=colour, outline=(0, 0, 0))
        x += line_h + 2
        draw.text((x, y), text, fill=(0, 0, 0), font=font)
        x += math.ceil(draw.textlength(text, font=font)) + 2 * line_h
    return x - x0


def save_overlay_grid(items, path, ncols=4, normalized=False, mean=None, std=None, pad=8,
                      min_panel=256, font_size=16, sort=True):
    """Tile cases into one PNG under a colour legend, each with a caption (e.g. "case_12 Dice 0.91").

    Items are (PIL image, caption) pairs, or dicts {image, gt, pred, label} that are drawn with
    `overlay`. `normalized=True` means float images carry CLIP's mean/std, which is undone;
    `mean`/`std` override it for another normalisation. Panels are enlarged by a whole factor to
    at least `min_panel` px and, with `sort`, ordered naturally by caption.
    """
    if normalized and mean is None:
        mean, std = CLIP_MEAN, CLIP_STD
    tiles = [_grid_item(it, mean, std) for it in items]
    if not tiles:
        raise ValueError(f"save_overlay_grid: no images to write to {path}")
    tiles = sorted(tiles, key=lambda t: natural_key(t[1])) if sort else tiles
    tiles = [(_enlarge(im.convert("RGB"), min_panel), str(c)) for im, c in tiles]
    font, line_h = _font(font_size), font_size + 6
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    legend_w = _draw_legend(measure, 0, 0, font, line_h)
    # Cells are wide enough for the caption too, so it never runs into the next tile.
    cw = max(max(im.width, math.ceil(measure.textlength(c, font=font))) for im, c in tiles) + pad
    ch = max(im.height for im, _ in tiles) + line_h + pad
    ncols = max(1, min(ncols, len(tiles)))
    top = pad + line_h + pad  # the legend line
    sheet = Image.new("RGB", (max(ncols * cw + pad, legend_w + 2 * pad),
                              top + math.ceil(len(tiles) / ncols) * ch), "white")
    draw = ImageDraw.Draw(sheet)
    _draw_legend(draw, pad, pad, font, line_h)
    for i, (im, caption) in enumerate(tiles):
        x, y = pad + (i % ncols) * cw, top + (i // ncols) * ch
        draw.text((x, y), caption, fill=(0, 0, 0), font=font)
        sheet.paste(im, (x, y + line_h))
    with atomic_path(path) as tmp:
        sheet.save(tmp, format="PNG")


# ----------------------------------------------------------------------------- SVG plotting

W, H = 480, 360  # one plot panel, in SVG units
LEFT, RIGHT, TOP, BOTTOM = 60, 20, 36, 48  # margins around the plot box


def _nice_ticks(lo, hi, n=5, integer=False):
    """About n round tick values covering [lo, hi]; whole numbers only with `integer` (epochs)."""
    raw = max((hi - lo) / n, 1.0) if integer else (hi - lo) / n
    step = 10 ** math.floor(math.log10(raw))
    step *= next(m for m in ((1, 2, 5, 10) if integer else (1, 2, 2.5, 5, 10)) if m * step >= raw)
    first = math.ceil(lo / step - 1e-9) * step
    return [first + i * step for i in range(int((hi - first) / step + 1e-9) + 1)]


def _svg_open(width, height):
    return [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
            f'viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="11">',
            f'<rect width="{width}" height="{height}" fill="white"/>']


def _axes_svg(title, xlabel, ylabel, xlim, ylim, ox=0, integer_x=False):
    """Frame, ticks, grid and labels of one panel whose left edge is at x = ox; returns
    (parts, to_px) for drawing on top."""
    pw, ph = W - LEFT - RIGHT, H - TOP - BOTTOM

    def to_px(x, y):
        return (ox + LEFT + (x - xlim[0]) / (xlim[1] - xlim[0]) * pw,
                TOP + ph - (y - ylim[0]) / (ylim[1] - ylim[0]) * ph)

    parts = [f'<text x="{ox + W / 2}" y="20" text-anchor="middle" font-size="13">'
             f'{escape(title)}</text>',
             f'<rect x="{ox + LEFT}" y="{TOP}" width="{pw}" height="{ph}" fill="none" '
             'stroke="black"/>',
             f'<text x="{ox + LEFT + pw / 2}" y="{H - 10}" text-anchor="middle">'
             f'{escape(xlabel)}</text>',
             f'<text x="{ox + 14}" y="{TOP + ph / 2}" text-anchor="middle" '
             f'transform="rotate(-90 {ox + 14} {TOP + ph / 2})">{escape(ylabel)}</text>']
    parts += _ticks_svg(to_px, xlim, ylim, integer_x)
    return parts, to_px


def _ticks_svg(to_px, xlim, ylim, integer_x=False):
    parts = []
    for v in _nice_ticks(*xlim, integer=integer_x):
        x, y = to_px(v, ylim[0])
        parts.append(f'<line x1="{x:.1f}" y1="{y}" x2="{x:.1f}" y2="{y + 4}" stroke="black"/>'
                     f'<text x="{x:.1f}" y="{y + 16}" text-anchor="middle">{v:g}</text>')
    for v in _nice_ticks(*ylim):
        x, y = to_px(xlim[0], v)
        parts.append(f'<line x1="{x - 4}" y1="{y:.1f}" x2="{x}" y2="{y:.1f}" stroke="black"/>'
                     f'<text x="{x - 6}" y="{y + 4:.1f}" text-anchor="end">{v:g}</text>')
    return parts


def _polyline(points, to_px, colour, dash=""):
    pts = " ".join("{:.2f},{:.2f}".format(*to_px(x, y)) for x, y in points)
    extra = f' stroke-dasharray="{dash}"' if dash else ""
    return f'<polyline points="{pts}" fill="none" stroke="{colour}" stroke-width="1.5"{extra}/>'


def _markers(points, to_px, colour):
    """A dot per point: validation runs every few epochs, and a lone point has no line."""
    return [f'<circle cx="{x:.2f}" cy="{y:.2f}" r="3" fill="{colour}"/>'
            for x, y in (to_px(*p) for p in points)]


def _legend(entries, x0, y0):
    """Legend of (colour, text) entries, one per line, starting at (x0, y0)."""
    parts = []
    for i, (colour, text) in enumerate(entries):
        y = y0 + 14 * i
        parts.append(f'<line x1="{x0}" y1="{y}" x2="{x0 + 18}" y2="{y}" stroke="{colour}" '
                     f'stroke-width="2"/><text x="{x0 + 22}" y="{y + 4}">{escape(text)}</text>')
    return parts


def _legend_corner(corner, n_entries, ox=0):
    """(x0, y0) of a legend in a panel's "top" or "bottom" right corner."""
    y0 = TOP + 8 if corner == "top" else H - BOTTOM - 8 - 14 * (n_entries - 1)
    return ox + W - RIGHT - 150, y0


def save_roc_svg(scores, labels, path, title="ROC"):
    """ROC curve with the chance diagonal and the AUC in the legend, as SVG. Returns the AUC."""
    fpr, tpr, _ = roc_curve(scores, labels)
    auc = roc_auc(scores, labels)  # equals the trapezoid area under (fpr, tpr)
    parts, to_px = _axes_svg(title, "False positive rate", "True positive rate", (0, 1), (0, 1))
    parts.append(_polyline([(0, 0), (1, 1)], to_px, "gray", dash="4 3"))
    parts.append(_polyline(zip(fpr, tpr), to_px, PALETTE[0]))
    entries = [(PALETTE[0], f"ROC (AUC = {auc:.3f})"), ("gray", "chance")]
    parts += _legend(entries, *_legend_corner("bottom", 2))  # the curve rarely goes there
    write_text(path, "\n".join(_svg_open(W, H) + parts + ["</svg>\n"]))
    return auc


def _limits(values):
    lo, hi = min(values), max(values)
    if hi - lo < 1e-12:  # a flat series still needs a visible range
        lo, hi = lo - 0.5 - abs(lo) * 0.05, hi + 0.5 + abs(hi) * 0.05
    return lo, hi


def _finite(series):
    """{name: [(x, y), ...]} with non-finite points and then empty series left out."""
    clean = {name: [(float(x), float(y)) for x, y in pts if math.isfinite(x) and math.isfinite(y)]
             for name, pts in series.items()}
    return {name: pts for name, pts in clean.items() if pts}


def _xlim(*series):
    return _limits([x for s in series for pts in s.values() for x, _ in pts])


def _panel(series, colours, title, xlabel, ylabel, ox=0, corner="top", dots=False, xlim=None):
    """SVG parts of one line-plot panel; series are already finite and non-empty."""
    ys = [y for pts in series.values() for _, y in pts]
    parts, to_px = _axes_svg(title, xlabel, ylabel, xlim or _xlim(series), _limits(ys), ox,
                             integer_x=xlabel == "epoch")
    for pts, c in zip(series.values(), colours):
        parts.append(_polyline(sorted(pts), to_px, c))
        parts += _markers(pts, to_px, c) if dots else []
    return parts + _legend(list(zip(colours, series)), *_legend_corner(corner, len(series), ox))


def save_curves_svg(series, path, title, xlabel="epoch", ylabel="value"):
    """Line plot of {name: [(x, y), ...]} (losses, metrics) as SVG; non-finite points are skipped."""
    clean = _finite(series)
    if not clean:
        raise ValueError(f"save_curves_svg: no finite points to plot in {path} "
                         f"(series: {list(series)})")
    colours = [PALETTE[i % len(PALETTE)] for i in range(len(clean))]
    parts = _panel(clean, colours, title, xlabel, ylabel)
    write_text(path, "\n".join(_svg_open(W, H) + parts + ["</svg>\n"]))


def _val_value(val, metric):
    """A validation record's metric as a float: a plain number, or a report's {"mean": ...}."""
    v = (val or {}).get(metric)
    v = v.get("mean") if isinstance(v, dict) else v
    return float(v) if isinstance(v, (int, float)) else math.nan  # None: no finite value


def training_series(records, metric):
    """({seed: [(epoch, loss)]}, {seed: [(epoch, val metric)]}) from log.jsonl records."""
    loss, val = {}, {}
    for r in records:
        if "epoch" not in r:
            continue  # e.g. the test record a script logs after training
        name = f"seed {r['seed']}" if "seed" in r else "run"
        if "loss" in r:
            loss.setdefault(name, []).append((r["epoch"], r["loss"]))
        if "val" in r:
            val.setdefault(name, []).append((r["epoch"], _val_value(r["val"], metric)))
    return loss, val


def save_training_curves(records, path, metric, loss_name="training loss", metric_name=None,
                         title=""):
    """Training loss (left) and validation `metric` (right) per epoch and seed, one SVG.

    `records` are log.jsonl dicts: {"seed", "epoch", "loss"} every epoch, plus "val": {metric:
    value or {"mean": value}} on validation epochs. Seeds keep one colour in both panels.
    Raises ValueError when no record has a finite loss.
    """
    loss, val = (_finite(s) for s in training_series(records, metric))
    if not loss:
        raise ValueError(f"save_training_curves: no finite training loss to plot in {path}; "
                         "records need 'epoch' and 'loss'")
    names = sorted(loss, key=natural_key)
    colours = {name: PALETTE[i % len(PALETTE)] for i, name in enumerate(names)}
    metric_name, xlim = metric_name or metric, _xlim(loss, val)  # one epoch axis for both
    parts = _panel({k: loss[k] for k in names}, list(colours.values()),
                   f"{title} training".strip(), "epoch", loss_name, xlim=xlim)
    if val:
        val = {k: val[k] for k in sorted(val, key=natural_key)}
        # Rising metrics leave the bottom-right corner free; dots, as validation is sparse.
        parts += _panel(val, [colours.get(k, "black") for k in val],
                        f"{title} validation".strip(), "epoch", f"validation {metric_name}",
                        ox=W, corner="bottom", dots=True, xlim=xlim)
    else:
        parts.append(f'<text x="{W + W / 2}" y="{H / 2}" text-anchor="middle">'
                     f'no finite validation {escape(metric_name)} in the log</text>')
    write_text(path, "\n".join(_svg_open(2 * W, H) + parts + ["</svg>\n"]))
