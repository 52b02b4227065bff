"""Report figures: segmentation overlays, ROC curves and training curves, without matplotlib.

- `overlay` draws a test case in the style of seed 003, Fig. 4: ground truth missed by the
  prediction in red, false positives in green, true positives in yellow, blended over the
  grayscale image. `save_overlay_grid` tiles several cases, each with a small caption, into one PNG.
- `roc_curve_points` follows scikit-learn's `roc_curve(..., drop_intermediate=False)`: one point
  per distinct score, tied scores move together, and a first point (0, 0) at threshold +inf.
  The positive class is 1 (malignant, DESIGN.md -> Labels).
- `save_roc_svg` and `save_curves_svg` write plain SVG text.

PNG goes through Pillow (a dependency of torchvision); nothing here imports a model or torch.
Every file is written to a temporary file in the same folder and then moved into place with
os.replace, so a reader never sees a half-written figure.
"""
import math
from xml.sax.saxutils import escape

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from .fileio import atomic_path

# Fig. 4 colours (RGB): ground truth only (false negative), false positive, true positive.
RED, GREEN, YELLOW = (255, 0, 0), (0, 255, 0), (255, 255, 0)
# CLIP's normalisation (OpenAI), undone when a caller says its float images are normalised.
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
PALETTE = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf"]


# ----------------------------------------------------------------------------- atomic writes

def _atomic_write(path, write_fn):
    """Call write_fn(file_object) on a temp file next to `path`, then os.replace it into place."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        write_fn(f)


def _write_text(path, text):
    _atomic_write(path, lambda f: f.write(text.encode("utf-8")))


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


def save_overlay_grid(items, path, ncols=4, normalized=False, mean=None, std=None, pad=4):
    """Tile cases into one PNG, each with a small caption (e.g. "case_12 Dice 0.91") above it.

    Items are (PIL image, caption) pairs, or dicts {image, gt, pred, label} that are drawn with
    `overlay`. `normalized=True` means float images carry CLIP's mean/std, which is undone;
    `mean`/`std` override it for another normalisation. Cells take the largest tile's size.
    """
    if normalized and mean is None:
        mean, std = CLIP_MEAN, CLIP_STD
    tiles = [_grid_item(it, mean, std) for it in items]
    if not tiles:
        raise ValueError(f"save_overlay_grid: no images to write to {path}")
    font = ImageFont.load_default()
    cap_h = 14  # one line of Pillow's default bitmap font plus a little room
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    # Cells are wide enough for the caption too, so it never runs into the next tile.
    cw = max(max(im.width, math.ceil(measure.textlength(str(c), font=font))) for im, c in tiles) + pad
    ch = max(im.height for im, _ in tiles) + cap_h + pad
    ncols = max(1, min(ncols, len(tiles)))
    sheet = Image.new("RGB", (ncols * cw + pad, math.ceil(len(tiles) / ncols) * ch + pad), "white")
    draw = ImageDraw.Draw(sheet)
    for i, (im, caption) in enumerate(tiles):
        x, y = pad + (i % ncols) * cw, pad + (i // ncols) * ch
        draw.text((x, y), str(caption), fill=(0, 0, 0), font=font)
        sheet.paste(im.convert("RGB"), (x, y + cap_h))
    _atomic_write(path, lambda f: sheet.save(f, format="PNG"))


# ----------------------------------------------------------------------------- ROC

def roc_curve_points(scores, labels):
    """(fpr, tpr, thresholds) like sklearn.metrics.roc_curve(labels, scores, drop_intermediate=False).

    `labels` are 0/1 with 1 positive; `scores` are higher for the positive class.
    """
    s, y = _to_numpy(scores).astype(np.float64).ravel(), _to_numpy(labels).ravel()
    if s.shape != y.shape or not np.isin(y, (0, 1)).all():
        raise ValueError("roc_curve_points: need one 0/1 label per score "
                         f"(got {s.size} scores, labels {np.unique(y)[:5]})")
    if y.min() == y.max():
        raise ValueError("roc_curve_points: ROC needs both classes in `labels`; got only "
                         f"class {int(y[0]) if y.size else 'none'}")
    order = np.argsort(-s, kind="mergesort")  # descending, stable
    s, y = s[order], y[order].astype(np.float64)
    # Last index of each run of tied scores: tied cases cross the threshold together.
    ends = np.r_[np.flatnonzero(np.diff(s)), s.size - 1]
    tps = np.cumsum(y)[ends]
    fps = (ends + 1) - tps
    fpr = np.r_[0.0, fps / fps[-1]]
    tpr = np.r_[0.0, tps / tps[-1]]
    return fpr, tpr, np.r_[np.inf, s[ends]]


def auc_trapezoid(fpr, tpr):
    """Area under a curve of points sorted by fpr (trapezoid rule), as sklearn.metrics.auc."""
    fpr, tpr = np.asarray(fpr, np.float64), np.asarray(tpr, np.float64)
    return float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2.0))


# ----------------------------------------------------------------------------- SVG plotting

W, H = 480, 360
LEFT, RIGHT, TOP, BOTTOM = 60, 20, 36, 48  # margins around the plot box, in SVG units


def _nice_ticks(lo, hi, n=5):
    """About n round tick values covering [lo, hi]."""
    raw = (hi - lo) / n
    step = 10 ** math.floor(math.log10(raw))
    step *= next(m for m in (1, 2, 2.5, 5, 10) if m * step >= raw)
    first = math.ceil(lo / step - 1e-9) * step
    return [first + i * step for i in range(int((hi - first) / step + 1e-9) + 1)]


def _axes_svg(title, xlabel, ylabel, xlim, ylim):
    """SVG header, frame, ticks, grid and labels; returns (parts, to_px) for drawing on top."""
    pw, ph = W - LEFT - RIGHT, H - TOP - BOTTOM

    def to_px(x, y):
        return (LEFT + (x - xlim[0]) / (xlim[1] - xlim[0]) * pw,
                TOP + ph - (y - ylim[0]) / (ylim[1] - ylim[0]) * ph)

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" '
             f'viewBox="0 0 {W} {H}" font-family="sans-serif" font-size="11">',
             f'<rect width="{W}" height="{H}" fill="white"/>',
             f'<text x="{W / 2}" y="20" text-anchor="middle" font-size="13">{escape(title)}</text>',
             f'<rect x="{LEFT}" y="{TOP}" width="{pw}" height="{ph}" fill="none" stroke="black"/>',
             f'<text x="{LEFT + pw / 2}" y="{H - 10}" text-anchor="middle">{escape(xlabel)}</text>',
             f'<text x="14" y="{TOP + ph / 2}" text-anchor="middle" '
             f'transform="rotate(-90 14 {TOP + ph / 2})">{escape(ylabel)}</text>']
    parts += _ticks_svg(to_px, xlim, ylim)
    return parts, to_px


def _ticks_svg(to_px, xlim, ylim):
    parts = []
    for v in _nice_ticks(*xlim):
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


def _legend(entries, x0=None, y0=None):
    """Legend box of (colour, text) entries in the plot's top-right corner (or at x0, y0)."""
    x0 = W - RIGHT - 150 if x0 is None else x0
    y0 = TOP + 8 if y0 is None else y0
    parts = []
    for i, (colour, text) in enumerate(entries):
        y = y0 + 14 * i
        parts.append(f'<line x1="{x0}" y1="{y}" x2="{x0 + 18}" y2="{y}" stroke="{colour}" '
                     f'stroke-width="2"/><text x="{x0 + 22}" y="{y + 4}">{escape(text)}</text>')
    return parts


def save_roc_svg(scores, labels, path, title="ROC"):
    """ROC curve with the chance diagonal and the AUC in the legend, as SVG. Returns the AUC."""
    fpr, tpr, _ = roc_curve_points(scores, labels)
    auc = auc_trapezoid(fpr, tpr)
    parts, to_px = _axes_svg(title, "False positive rate", "True positive rate", (0, 1), (0, 1))
    parts.append(_polyline([(0, 0), (1, 1)], to_px, "gray", dash="4 3"))
    parts.append(_polyline(zip(fpr, tpr), to_px, PALETTE[0]))
    parts += _legend([(PALETTE[0], f"ROC (AUC = {auc:.3f})"), ("gray", "chance")],
                     y0=H - BOTTOM - 30)  # bottom-right: the curve rarely goes there
    _write_text(path, "\n".join(parts + ["</svg>\n"]))
    return auc


def _limits(values):
    lo, hi = min(values), max(values)
    if hi - lo < 1e-12:  # a flat series still needs a visible range
        lo, hi = lo - 0.5 - abs(lo) * 0.05, hi + 0.5 + abs(hi) * 0.05
    return lo, hi


def save_curves_svg(series, path, title, xlabel="epoch", ylabel="value"):
    """Line plot of {name: [(x, y), ...]} (losses, metrics) as SVG; non-finite points are skipped."""
    clean = {name: [(float(x), float(y)) for x, y in pts if math.isfinite(x) and math.isfinite(y)]
             for name, pts in series.items()}
    clean = {name: pts for name, pts in clean.items() if pts}
    if not clean:
        raise ValueError(f"save_curves_svg: no finite points to plot in {path} "
                         f"(series: {list(series)})")
    xs = [x for pts in clean.values() for x, _ in pts]
    ys = [y for pts in clean.values() for _, y in pts]
    parts, to_px = _axes_svg(title, xlabel, ylabel, _limits(xs), _limits(ys))
    colours = [PALETTE[i % len(PALETTE)] for i in range(len(clean))]
    parts += [_polyline(sorted(pts), to_px, c) for pts, c in zip(clean.values(), colours)]
    parts += _legend(list(zip(colours, clean)))
    _write_text(path, "\n".join(parts + ["</svg>\n"]))
