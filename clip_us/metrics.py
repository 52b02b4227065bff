"""Evaluation metrics: segmentation (Dice, IoU, HD95, ASD/ASSD), classification (accuracy, ROC-AUC,
ROC curve, binary report, bootstrap CI), and image–text retrieval / alignment scores.

Stand-alone: numpy, scipy and torch only, nothing else from clip_us, so the file can be copied.

The segmentation metrics take one image (2-D) or one volume (3-D): a [B, H, W] batch is scored as
one volume. :func:`dice_per_image` scores a batch image by image, as the scripts do.

Segmentation follows MONAI's definitions (``monai.metrics``), which the official code
(jinggqu/NextGen-UIA) of the ultrasound-CLIP paper (Qu et al., "Adapting Vision-Language Foundation
Model for Next Generation Medical Ultrasound Image Analysis") used, per image, in pixels unless
``spacing`` is given:

- Boundary ("edge") of a mask = mask XOR its binary erosion by the cross-shaped structuring element
  (4-connectivity in 2-D, 6 in 3-D), with everything outside the image counted as background, so
  pixels on the image border are boundary pixels. This is ``monai.metrics.utils.get_mask_edges``
  (crop to the union's box + 1, ``scipy.ndimage.binary_erosion``, XOR) and medpy's
  ``__surface_distances``; both give the same boundary.
- Distances are Euclidean from each boundary pixel of one mask to the nearest boundary pixel of the
  other (MONAI uses a KD-tree, medpy a distance transform; same values). We crop both masks to the
  joint bounding box plus a 1-pixel zero margin and run ``scipy.ndimage.distance_transform_edt``
  on the boundary complement: the crop is exact because every boundary pixel lies inside the box.
- HD95 (MONAI, default): max of the two *directed* 95th percentiles. medpy's ``hd95`` takes the 95th
  percentile of both directions *pooled* (``pooled=True`` here); on random blobs the two differ by
  up to several pixels (MONAI's is usually, not always, the larger).
- ASD (MONAI's default ``symmetric=False``): the *directed* mean distance from the prediction's
  boundary to the ground truth's. The official code reports this as "ASD". medpy's ``asd(pred, gt)``
  is the same directed quantity.
- ASSD: mean of both directions' distances pooled (concatenated) — MONAI ``symmetric=True`` and
  medpy 0.5 ``assd`` agree on this (it is not the average of the two directed means).

Edge cases, as MONAI (medpy raises on empty masks):
- both masks empty: hd95, asd, assd are nan; dice and iou are nan (``ignore_empty=True``).
- exactly one mask empty: asd and assd are inf, but hd95 is nan: MONAI's distances are all inf and
  ``torch.quantile`` of an all-inf array is nan (its plain Hausdorff distance, no percentile, would
  be inf). dice and iou are nan if gt is empty, else 0.
- masks touching the image border, single pixels, several components and holes need no special
  case: border pixels are boundary, a single pixel is its own boundary, holes have inner boundaries.
MONAI computes in float32; we keep float64 (medpy's precision), so values agree with MONAI to
float32 rounding (relative ~1e-7) and with medpy exactly.
``segmentation_report`` drops non-finite per-image values and counts them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import torch
from scipy.ndimage import distance_transform_edt
from scipy.stats import rankdata

SEG_METRICS = ("dice", "iou", "hd95", "asd_directed", "assd")
SEG_UNITS = {"dice": "fraction", "iou": "fraction", "hd95": "px", "asd_directed": "px",
             "assd": "px"}


# ----------------------------------------------------------------------------- input checks
def _as_mask(x, name: str) -> np.ndarray:
    """A boolean numpy mask from a bool/0-1 numpy array or torch tensor."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    x = np.asarray(x)
    if x.dtype != bool:
        if not np.all((x == 0) | (x == 1)):
            raise ValueError(f"metrics: {name} must be a binary mask (bool or 0/1 values); "
                             f"threshold or argmax your prediction first (got dtype {x.dtype}).")
        x = x != 0
    return x


def _pair(pred, gt) -> tuple[np.ndarray, np.ndarray]:
    p, g = _as_mask(pred, "pred"), _as_mask(gt, "gt")
    if p.shape != g.shape or p.ndim not in (2, 3):
        raise ValueError(f"metrics: pred and gt must be 2-D or 3-D masks of the same shape, "
                         f"got {p.shape} and {g.shape}; pass one image at a time (no batch axis).")
    return p, g


def _spacing(spacing, ndim: int):
    if spacing is None:
        return None
    s = np.asarray(spacing, dtype=np.float64).reshape(-1)
    s = np.repeat(s, ndim) if s.size == 1 else s
    if s.size != ndim or not np.all(s > 0):
        raise ValueError(f"metrics: spacing must be positive, one value or one per axis; got {spacing}.")
    return tuple(s)


# ----------------------------------------------------------------------------- overlap
def dice(pred, gt, ignore_empty: bool = True) -> float:
    """2|P∩G| / (|P|+|G|), as MONAI DiceMetric. Empty gt: nan (``ignore_empty``), else 1 if pred is
    empty too and 0 otherwise. A [B, H, W] batch is one 3-D volume here: one Dice over all its
    pixels, which is not the mean of its images' Dice; :func:`dice_per_image` gives those."""
    p, g = _pair(pred, gt)
    n_p, n_g = np.count_nonzero(p), np.count_nonzero(g)
    if n_g == 0:
        return math.nan if ignore_empty else float(n_p == 0)
    return 2.0 * np.count_nonzero(p & g) / (n_p + n_g)


def dice_per_image(pred, gt, ignore_empty: bool = True) -> np.ndarray:
    """[B] float64: :func:`dice` of each image of a [B, H, W] (or [B, D, H, W]) batch, MONAI
    DiceMetric's per-item values. An empty gt gives nan (``ignore_empty``); the scripts average
    the finite values (:func:`summarize`, as :func:`segmentation_report` does) and count the rest."""
    p, g = _as_mask(pred, "pred"), _as_mask(gt, "gt")
    if p.shape != g.shape or p.ndim not in (3, 4):
        raise ValueError(f"dice_per_image: pred and gt must be batches [B, H, W] or [B, D, H, W] "
                         f"of the same shape, got {p.shape} and {g.shape}; squeeze a channel "
                         f"axis, or use dice() for one image.")
    return np.array([dice(a, b, ignore_empty) for a, b in zip(p, g)], dtype=np.float64)


def iou(pred, gt, ignore_empty: bool = True) -> float:
    """|P∩G| / |P∪G|, as MONAI MeanIoU; empty gt handled as in :func:`dice`."""
    p, g = _pair(pred, gt)
    inter, union = np.count_nonzero(p & g), np.count_nonzero(p | g)
    if not g.any():
        return math.nan if ignore_empty else float(union == 0)
    return inter / union


# ----------------------------------------------------------------------------- surface distances
def _crop(p: np.ndarray, g: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Both masks cut to the bounding box of p|g and surrounded by one ring of zeros (so the
    erosion sees background outside the image, like scipy's border_value=0)."""
    union = p | g
    box = []
    for axis in range(union.ndim):
        hit = np.flatnonzero(union.any(axis=tuple(a for a in range(union.ndim) if a != axis)))
        box.append(slice(hit[0], hit[-1] + 1))
    box = tuple(box)
    inner = (slice(1, -1),) * union.ndim
    out = []
    for m in (p, g):
        padded = np.zeros([s.stop - s.start + 2 for s in box], dtype=bool)  # box + 1 on each side
        padded[inner] = m[box]
        out.append(padded)
    return out[0], out[1]


def _boundary(padded: np.ndarray) -> np.ndarray:
    """Mask minus its erosion by the cross (4-/6-connectivity); input has a zero ring, output is
    the box without the ring."""
    inner = (slice(1, -1),) * padded.ndim
    core = padded[inner]
    eroded = core.copy()
    for axis in range(padded.ndim):  # a pixel survives only if both neighbours on every axis are set
        for shift in (slice(None, -2), slice(2, None)):
            eroded &= padded[inner[:axis] + (shift,) + inner[axis + 1:]]
    return core & ~eroded


def _edges(p: np.ndarray, g: np.ndarray):
    """Boundaries of both masks on their joint bounding box, or, for empty masks, the float every
    distance metric takes (MONAI): nan when both are empty, inf when only one is."""
    has_p, has_g = p.any(), g.any()
    if not (has_p and has_g):
        return math.inf if (has_p or has_g) else math.nan
    ep, eg = (_boundary(m) for m in _crop(p, g))
    return ep, eg


def _directed(src: np.ndarray, dst: np.ndarray, sampling) -> np.ndarray:
    """Distance from each pixel of boundary `src` to the nearest pixel of boundary `dst`.

    The EDT of ``~dst`` gives every pixel's nearest `dst` pixel (feature transform); we turn it into
    distances only at the `src` pixels, with scipy's own arithmetic (so values are bit-identical to
    ``distance_transform_edt(~dst, sampling)[src]``) but without its full-image float passes.
    """
    nearest = distance_transform_edt(~dst, sampling=sampling, return_distances=False, return_indices=True)
    at = np.nonzero(src)  # C order, like boolean indexing
    sq = np.zeros(len(at[0]))
    for axis, idx in enumerate(at):
        delta = (nearest[axis][at] - idx).astype(np.float64)
        if sampling is not None:
            delta *= sampling[axis]
        sq += delta * delta
    return np.sqrt(sq)


def surface_distances(pred, gt, spacing=None, symmetric: bool = True):
    """Boundary distances (pred→gt, gt→pred) as float64 arrays — only (pred→gt,) when not
    ``symmetric``; for empty masks a float instead (nan both empty, inf one empty)."""
    p, g = _pair(pred, gt)
    sampling = _spacing(spacing, p.ndim)  # checked before the empty-mask shortcut
    edges = _edges(p, g)
    if isinstance(edges, float):
        return edges
    ep, eg = edges
    if not symmetric:
        return (_directed(ep, eg, sampling),)
    return _directed(ep, eg, sampling), _directed(eg, ep, sampling)


def _percentile(d: np.ndarray, q: float) -> float:
    """``np.percentile(d, q)`` (linear method, same arithmetic, so identical values) via a partial
    sort, several times faster on the few hundred distances of one mask pair."""
    pos = (d.size - 1) * (q / 100)
    lo = int(pos)
    hi = min(lo + 1, d.size - 1)
    part = np.partition(d, (lo, hi))
    a, b, t = part[lo], part[hi], pos - lo
    diff = b - a
    return float(b - diff * (1 - t) if t >= 0.5 else a + diff * t)  # numpy's _lerp


def hd95(pred, gt, spacing=None, pooled: bool = False, percentile: float = 95.0) -> float:
    """95th-percentile Hausdorff distance. Default (MONAI): max of the two directed percentiles.
    ``pooled=True`` (medpy): the percentile of both directions' distances together."""
    if not 0 <= percentile <= 100:
        raise ValueError(f"hd95: percentile must be in [0, 100], got {percentile}.")
    d = surface_distances(pred, gt, spacing)
    if isinstance(d, float):  # an empty mask: nan, also when only one is empty (see module docstring)
        return math.nan
    if pooled:
        return _percentile(np.concatenate(d), percentile)
    return max(_percentile(d[0], percentile), _percentile(d[1], percentile))


def asd(pred, gt, symmetric: bool = False, spacing=None) -> float:
    """Average surface distance. Default (MONAI, and the official code's "ASD"): directed, mean over
    the prediction's boundary of the distance to gt's boundary. ``symmetric=True``: see :func:`assd`."""
    d = surface_distances(pred, gt, spacing, symmetric=symmetric)
    if isinstance(d, float):
        return d
    return float(np.concatenate(d).mean())


def assd(pred, gt, spacing=None) -> float:
    """Average symmetric surface distance: mean of both directions' distances pooled
    (MONAI ``symmetric=True`` == medpy ``assd``)."""
    return asd(pred, gt, symmetric=True, spacing=spacing)


# ----------------------------------------------------------------------------- aggregation
def summarize(values: Sequence[float]) -> dict:
    """mean/std (population, ddof=0) over the finite values; counts what was dropped. JSON-ready:
    mean/std are None when nothing finite is left."""
    v = np.asarray([float(x) for x in values], dtype=np.float64)
    kept = v[np.isfinite(v)]
    n = int(kept.size)
    return {"mean": float(kept.mean()) if n else None, "std": float(kept.std()) if n else None,
            "n": n, "n_dropped": int(v.size - n)}


def seed_summary(values: Sequence) -> dict:
    """{mean, std, per_seed}: ``summarize`` over one metric's per-seed values, every seed's value
    kept in per_seed. A seed without a finite value (None: e.g. no test image had a finite HD95)
    is left out of mean/std, which are None when no seed has one. results.json's form."""
    vals = [None if v is None else float(v) for v in values]
    s = summarize([v for v in vals if v is not None])
    return {"mean": s["mean"], "std": s["std"], "per_seed": vals}


def per_image(pred, gt, spacing=None) -> dict:
    """Every SEG_METRICS value of one (prediction, ground truth) pair."""
    return {"dice": dice(pred, gt), "iou": iou(pred, gt), "hd95": hd95(pred, gt, spacing),
            "asd_directed": asd(pred, gt, spacing=spacing), "assd": assd(pred, gt, spacing)}


def segmentation_report(preds, gts=None, spacing=None) -> dict:
    """Per-image metrics averaged over images, non-finite values dropped and counted.

    Two forms: ``segmentation_report(preds, gts)`` computes dice, iou, hd95, asd_directed and assd
    for each (pred, gt) pair; ``segmentation_report({"dice": [...], ...})`` summarises per-image
    values already computed. Returns ``{metric: {"mean", "std", "n", "n_dropped"}}``.
    """
    if gts is None:
        if not isinstance(preds, Mapping):
            raise TypeError("segmentation_report: pass (preds, gts) or one dict {metric: [values]}.")
        return {k: summarize(v) for k, v in preds.items()}
    preds, gts = list(preds), list(gts)
    if len(preds) != len(gts):
        raise ValueError(f"segmentation_report: {len(preds)} predictions but {len(gts)} ground truths.")
    per = [per_image(p, g, spacing) for p, g in zip(preds, gts)]
    return {k: summarize([r[k] for r in per]) for k in SEG_METRICS}


# ----------------------------------------------------------------------------- classification
def _vector(x, name: str, dtype=np.float64) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    v = np.asarray(x, dtype=dtype).reshape(-1)
    if v.size == 0 or (dtype == np.float64 and not np.all(np.isfinite(v))):
        raise ValueError(f"metrics: {name} must be a non-empty vector of finite numbers.")
    return v


def _labels(labels) -> np.ndarray:
    y = _vector(labels, "labels")
    if not np.all((y == 0) | (y == 1)):
        raise ValueError("metrics: labels must be 0 (benign, negative) or 1 (malignant, positive).")
    return y.astype(np.int64)


def accuracy(preds, labels) -> float:
    """Fraction of predicted class indices equal to the labels."""
    p, y = _vector(preds, "preds"), _vector(labels, "labels")
    if p.shape != y.shape:
        raise ValueError(f"accuracy: {p.size} predictions but {y.size} labels.")
    return float(np.mean(p == y))


def roc_auc(scores, labels) -> float:
    """ROC-AUC as the Mann–Whitney U statistic: P(score_pos > score_neg) + ½ P(tie), which is what
    scikit-learn's trapezoidal ``roc_auc_score`` gives with ties. Class 1 is positive."""
    s, y = _vector(scores, "scores"), _labels(labels)
    if s.shape != y.shape:
        raise ValueError(f"roc_auc: {s.size} scores but {y.size} labels.")
    n_pos = int(y.sum())
    n_neg = y.size - n_pos
    if n_pos == 0 or n_neg == 0:
        raise ValueError("roc_auc: only one class is present in labels; ROC-AUC is undefined. "
                         "Evaluate on a set with both benign (0) and malignant (1) cases.")
    ranks = rankdata(s)  # average ranks: a tie between a positive and a negative counts ½
    return float((ranks[y == 1].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def roc_curve(scores, labels) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(fpr, tpr, thresholds) as scikit-learn's ``roc_curve(labels, scores, drop_intermediate=False)``:
    one point per distinct score, tied scores cross the threshold together, and a first point
    (0, 0) at threshold +inf. Class 1 (malignant) is positive; the trapezoid area under these
    points equals ``roc_auc``."""
    s, y = _vector(scores, "scores"), _labels(labels)
    if s.shape != y.shape:
        raise ValueError(f"roc_curve: {s.size} scores but {y.size} labels.")
    if y.min() == y.max():
        raise ValueError("roc_curve: only one class is present in labels; a ROC curve needs both "
                         "benign (0) and malignant (1) cases.")
    order = np.argsort(-s, kind="mergesort")  # descending, stable
    s, y = s[order], y[order]
    ends = np.r_[np.flatnonzero(np.diff(s)), s.size - 1]  # last index of each run of tied scores
    tps = np.cumsum(y)[ends].astype(np.float64)
    fps = (ends + 1) - tps
    return np.r_[0.0, fps / fps[-1]], np.r_[0.0, tps / tps[-1]], np.r_[np.inf, s[ends]]


def binary_report(probs, labels, threshold: float = 0.5) -> dict:
    """Acc, AUC, sensitivity, specificity, F1 and the confusion matrix [[TN, FP], [FN, TP]] with
    malignant (1) as the positive class. Predicted positive when prob > threshold (strictly, like
    argmax over two classes, which picks class 0 on a tie). Needs both classes (for AUC)."""
    p, y = _vector(probs, "probs"), _labels(labels)
    auc = roc_auc(p, y)
    pred = (p > threshold).astype(np.int64)
    tp, fp = int(np.sum((pred == 1) & (y == 1))), int(np.sum((pred == 1) & (y == 0)))
    fn, tn = int(np.sum((pred == 0) & (y == 1))), int(np.sum((pred == 0) & (y == 0)))
    return {"acc": (tp + tn) / y.size, "auc": auc, "sensitivity": tp / (tp + fn),
            "specificity": tn / (tn + fp), "f1": 2 * tp / (2 * tp + fp + fn),
            "confusion_matrix": [[tn, fp], [fn, tp]], "threshold": threshold, "n": int(y.size)}


def bootstrap_ci(metric_fn: Callable, *arrays, n: int = 1000, seed: int = 0, level: float = 0.95,
                 strata=None) -> dict:
    """Percentile bootstrap CI of ``metric_fn(*arrays)`` (EchoCare-CLIP reports these).

    Rows are resampled with replacement, the same rows for every array. ``strata`` (e.g. the labels)
    resamples within each stratum, keeping class counts fixed: use it for AUC, which is undefined
    on a resample with one class (such a resample raises; we never skip resamples silently).
    Returns ``{"value", "low", "high", "level", "n"}``.
    """
    arrays = [np.asarray(a.detach().cpu() if isinstance(a, torch.Tensor) else a) for a in arrays]
    size = len(arrays[0])
    if any(len(a) != size for a in arrays) or size == 0:
        raise ValueError("bootstrap_ci: arrays must be non-empty and of equal length.")
    groups = [np.arange(size)] if strata is None else \
        [np.flatnonzero(np.asarray(strata) == s) for s in np.unique(strata)]
    rng = np.random.default_rng(seed)
    stats = np.empty(n)
    for b in range(n):
        idx = np.concatenate([rng.choice(g, size=g.size, replace=True) for g in groups])
        stats[b] = metric_fn(*(a[idx] for a in arrays))
    tail = 100 * (1 - level) / 2
    return {"value": float(metric_fn(*arrays)), "low": float(np.percentile(stats, tail)),
            "high": float(np.percentile(stats, 100 - tail)), "level": level, "n": n}


# ----------------------------------------------------------------------------- retrieval / alignment
def _embeddings(img, txt) -> tuple[np.ndarray, np.ndarray]:
    a, b = (np.asarray(x.detach().cpu().double() if isinstance(x, torch.Tensor) else x, dtype=np.float64)
            for x in (img, txt))
    if a.ndim != 2 or a.shape != b.shape or a.shape[0] < 2:
        raise ValueError(f"metrics: img and txt must be paired [N, D] embeddings with N >= 2, "
                         f"got {a.shape} and {b.shape}.")
    for name, e in (("img", a), ("txt", b)):
        if not np.allclose(np.linalg.norm(e, axis=1), 1.0, atol=1e-3):
            raise ValueError(f"metrics: {name} embeddings are not L2-normalised; divide each row "
                             f"by its norm first (e.g. F.normalize(x, dim=-1)).")
    return a, b


def alignment_scores(img, txt) -> dict:
    """EchoCare-CLIP alignment: paired = mean cosine of matched pairs, cross = mean cosine over i≠j,
    gap = paired − cross (paired alone rewards collapsed embeddings; always report all three)."""
    a, b = _embeddings(img, txt)
    n = len(a)
    paired_sum = float(np.einsum("nd,nd->", a, b))
    total = float(a.sum(0) @ b.sum(0))  # Σ_ij a_i·b_j without the [N, N] matrix
    paired, cross = paired_sum / n, (total - paired_sum) / (n * (n - 1))
    return {"paired": paired, "cross": cross, "gap": paired - cross}


# Retrieval is ranked as in the code of "Ultrasound Vision-Language Alignment via Contrastive
# Learning" (EchoCare-CLIP); train_contrastive.py's validation and evaluate.py both report it.
def _best_first(sim: np.ndarray, stable: bool) -> np.ndarray:
    """[rows, N] column indices of each row, best first: the one place where retrieval breaks
    ties. ``stable=False`` is the authors' call, ``np.argsort(-sim, axis=1)``: numpy's default
    (unstable) sort, whose order among equal scores depends on the dtype and on numpy's sorting
    kernel, so `sim` must be their float32 matrix. ``stable=True`` keeps equal scores in column
    order (this flatters collapsed embeddings, which is why the alignment gap is reported beside
    recall)."""
    return np.argsort(-sim, axis=1, kind="stable") if stable else np.argsort(-sim, axis=1)


def _first_match(sim: np.ndarray, match: np.ndarray, stable: bool) -> np.ndarray:
    """0-based position of each row's first matching column in the order of :func:`_best_first`."""
    hits = np.take_along_axis(match, _best_first(sim, stable), axis=1)  # [rows, N] bool, True at a match
    return hits.argmax(axis=1)


# The authors' order among tied scores is numpy's unstable sort on their one float32 matrix, and
# a block product can round differently in the last bit, which reorders ties: up to this many
# pairs (a [20k, 20k] float32 matrix, 1.6 GB, plus its argsort) the authors' mode computes theirs.
ONE_BLOCK = 20_000


def _chunked_ranks(a: np.ndarray, b: np.ndarray, g: np.ndarray, chunk: int, stable: bool) -> dict:
    """{"i2t", "t2i"}: each row's rank, where columns with the row's group id match.
    In the authors' mode (not `stable`) up to ONE_BLOCK pairs: their single ``img @ txt.T`` and
    its transpose for text-to-image, whatever `chunk`. Otherwise [chunk, N] similarity blocks
    keep memory O(chunk·N); beyond ONE_BLOCK pairs the authors' tie order then holds only as far
    as the blocks' products equal the whole matrix's bit for bit."""
    if not stable and len(a) <= ONE_BLOCK:
        sim, match = a @ b.T, g[:, None] == g[None, :]  # [N, N]; match is symmetric
        return {"i2t": _first_match(sim, match, stable), "t2i": _first_match(sim.T, match, stable)}
    ranks = {"i2t": [], "t2i": []}
    for start in range(0, len(a), chunk):
        rows = slice(start, start + chunk)
        match = g[rows, None] == g[None, :]  # [chunk, N]
        ranks["i2t"].append(_first_match(a[rows] @ b.T, match, stable))
        ranks["t2i"].append(_first_match((a @ b[rows].T).T, match, stable))  # [N, chunk] -> [chunk, N]
    return {d: np.concatenate(r) for d, r in ranks.items()}


def _retrieval_report(ranks: dict, ks) -> dict:
    out = {f"{d}_R@{k}": float(np.mean(r < k)) for d, r in ranks.items() for k in ks}
    out.update({f"{d}_mean_rank": float(np.mean(r) + 1) for d, r in ranks.items()})  # 1-based
    return out


def retrieval_ranked(img, txt, ks: Sequence[int] = (1, 5, 10), captions=None, chunk: int = 1024,
                     stable: bool = False) -> dict:
    """Recall@K both ways and the mean (1-based) rank, ranked as EchoCare-CLIP's code does.

    Strict (``captions=None``): row i matches only column i. Duplicate-aware (``captions`` = the
    caption texts, one per pair): every column whose caption text equals row i's counts, and the
    first of them in the same order gives the rank, so duplicate-aware recall >= strict recall
    (under one order). The order is :func:`_best_first`'s: by default the authors' (numpy's
    default sort on the float32 similarities), with ``stable`` a stable sort on float64 ones
    (ties in column order). Keys: ``i2t_R@1`` ... ``t2i_R@10``, ``i2t_mean_rank``,
    ``t2i_mean_rank``; the scripts report them through :func:`strict_retrieval` and
    :func:`dup_retrieval`.
    """
    a, b = _embeddings(img, txt)
    if not stable:  # the authors' similarity matrix is float32, and their tie order depends on it
        a, b = a.astype(np.float32), b.astype(np.float32)
    g = np.arange(len(a)) if captions is None else np.unique(np.asarray(captions), return_inverse=True)[1]
    if len(g) != len(a):
        raise ValueError(f"retrieval_ranked: {len(g)} captions for {len(a)} pairs.")
    return _retrieval_report(_chunked_ranks(a, b, g.reshape(-1), chunk, stable), ks)


def strict_retrieval(img, txt, ks: Sequence[int] = (1, 5, 10), chunk: int = 1024,
                     stable: bool = False) -> dict:
    """``strict_i2t_R@1`` ... ``strict_t2i_R@10`` and ``strict_*_mean_rank``: row i of `img`
    matches only row i of `txt` (:func:`retrieval_ranked` without captions), in the authors'
    order unless ``stable`` (evaluate.py and train_contrastive.py: --stable-ties)."""
    return {f"strict_{k}": v for k, v in retrieval_ranked(img, txt, ks, chunk=chunk, stable=stable).items()}


def dup_retrieval(img, txt, captions, ks: Sequence[int] = (1, 5, 10), chunk: int = 1024) -> dict:
    """``dup_i2t_R@1`` ... ``dup_t2i_R@10`` and ``dup_*_mean_rank``: pairs with identical caption
    texts are interchangeable (:func:`retrieval_ranked` with ``captions``), ranked in the stable
    order: the family is ours, and column order makes it the same on every machine."""
    return {f"dup_{k}": v for k, v in retrieval_ranked(img, txt, ks, captions, chunk, stable=True).items()}


def pair_scores(img, txt, captions, stable: bool = False) -> dict:
    """Alignment (paired, cross, gap), strict_* and dup_* retrieval of paired [N, D] embeddings:
    what train_contrastive.py's validation and evaluate.py both report, composed here once."""
    return {**alignment_scores(img, txt), **strict_retrieval(img, txt, stable=stable),
            **dup_retrieval(img, txt, captions)}


# ----------------------------------------------------------------------------- EchoCare-CLIP classification
# EchoCare-CLIP's protocol beyond retrieval: weighted F1, multi-class AUROC and the few-shot label
# sampling. Labels here are class indices 0..K-1 (any number of classes).
def _class_vector(labels, name: str = "labels") -> np.ndarray:
    y = _vector(labels, name)
    if not np.all((y >= 0) & (y == np.round(y))):
        raise ValueError(f"metrics: {name} must be class indices 0, 1, 2, ...")
    return y.astype(np.int64)


def weighted_f1(preds, labels) -> float:
    """F1 per class averaged with the true class counts as weights (scikit-learn's
    ``f1_score(average="weighted")``; a class never predicted nor present scores 0)."""
    p, y = np.asarray(preds).reshape(-1), np.asarray(labels).reshape(-1)
    if p.shape != y.shape or y.size == 0:
        raise ValueError(f"weighted_f1: {p.size} predictions but {y.size} labels.")
    total = 0.0
    for c in np.unique(y):
        tp = np.sum((p == c) & (y == c))
        denom = np.sum(p == c) + np.sum(y == c)  # 2·TP + FP + FN
        total += np.sum(y == c) * (2 * tp / denom)
    return float(total / y.size)


def multiclass_auroc(probs, labels) -> float:
    """AUROC of [N, K] class scores: the positive class's (column 1) AUC when K = 2, else the
    macro mean of one-vs-rest AUCs over the classes present in ``labels`` (at least two)."""
    s = np.asarray(probs.detach().cpu() if isinstance(probs, torch.Tensor) else probs, dtype=np.float64)
    y = _class_vector(labels)
    if s.ndim != 2 or len(s) != len(y) or y.max() >= s.shape[1]:
        raise ValueError(f"multiclass_auroc: need [N, K] scores for N labels in 0..K-1, got "
                         f"{s.shape} and {len(y)} labels (max {y.max()}).")
    if s.shape[1] == 2:
        return roc_auc(s[:, 1], y)
    present = np.unique(y)
    if len(present) < 2:
        raise ValueError("multiclass_auroc: only one class is present in labels; AUROC is undefined.")
    return float(np.mean([roc_auc(s[:, c], (y == c).astype(np.int64)) for c in present]))


def fewshot_indices(labels, fraction: float, seed: int, min_per_class: int = 2) -> np.ndarray:
    """Few-shot subset of training rows: per class ceil(fraction · count), at least
    ``min_per_class`` (never more than the class has), drawn without replacement with
    ``np.random.default_rng(seed)``. Returns the chosen row indices, sorted."""
    if not 0 < fraction <= 1:
        raise ValueError(f"fewshot_indices: fraction must be in (0, 1], got {fraction}")
    y = np.asarray(labels).reshape(-1)
    rng = np.random.default_rng(seed)
    chosen = []
    for c in np.unique(y):
        rows = np.flatnonzero(y == c)
        k = min(len(rows), max(min_per_class, math.ceil(fraction * len(rows) - 1e-9)))
        chosen.append(rng.choice(rows, size=k, replace=False))
    return np.sort(np.concatenate(chosen))
