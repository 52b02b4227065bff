"""Benchmark: HD95, ASD (directed) and ASSD per mask pair — clip_us.metrics vs MONAI vs medpy.

All three run in this process on the same 224×224 masks. Two mask sets:
- "lesion": one warped-ellipse lesion per ground truth and a perturbed prediction (sometimes with a
  small false-positive blob), the typical BUSI-like case;
- "blobs": thresholded smoothed noise over the whole image (many components, worst case for the crop).
Prints ms per pair, the speed-up of clip_us over each peer and the maximum absolute difference
(and, for MONAI, which computes in float32, the maximum relative one).
Run from the repository root: ``flock /tmp/clip_us_bench.lock python -m bench.bench_metrics [--pairs 100] [--repeat 5]``
"""

import argparse
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from medpy.metric import binary as medpy_binary
from monai.metrics import compute_average_surface_distance, compute_hausdorff_distance
from scipy.ndimage import gaussian_filter

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from clip_us import metrics  # noqa: E402

SIZE = 224


def lesion(rng, center, axes, wobble) -> np.ndarray:
    """Ellipse whose radius is modulated by smooth angular noise."""
    yy, xx = np.mgrid[:SIZE, :SIZE].astype(np.float64)
    dy, dx = (yy - center[0]) / axes[0], (xx - center[1]) / axes[1]
    angle = np.arctan2(dy, dx)
    harmonics = sum(rng.normal(0, wobble / k) * np.cos(k * angle + rng.uniform(0, 2 * np.pi))
                    for k in range(2, 7))
    return np.hypot(dy, dx) < 1 + harmonics


def lesion_pair(rng) -> tuple[np.ndarray, np.ndarray]:
    center = rng.uniform(60, 164, size=2)
    axes = rng.uniform(15, 55, size=2)
    gt = lesion(rng, center, axes, 0.15)
    pred = lesion(rng, center + rng.normal(0, 4, 2), axes * rng.uniform(0.85, 1.15, 2), 0.2)
    if rng.random() < 0.3:  # a false-positive blob elsewhere
        pred |= lesion(rng, rng.uniform(20, 204, 2), rng.uniform(3, 10, 2), 0.1)
    return pred, gt


def blob_pair(rng) -> tuple[np.ndarray, np.ndarray]:
    def blob():
        x = gaussian_filter(rng.standard_normal((SIZE, SIZE)), 8)
        return x > np.quantile(x, rng.uniform(0.75, 0.95))
    return blob(), blob()


def monai_fn(name):
    def to_t(m):
        return torch.as_tensor(m)[None, None].float()  # [1, 1, H, W]: batch, channel
    if name == "hd95":
        return lambda p, g: compute_hausdorff_distance(to_t(p), to_t(g), include_background=True,
                                                       percentile=95).item()
    if name == "asd":
        return lambda p, g: compute_average_surface_distance(to_t(p), to_t(g), include_background=True).item()
    return lambda p, g: compute_average_surface_distance(to_t(p), to_t(g), include_background=True,
                                                          symmetric=True).item()


OURS = {"hd95": metrics.hd95, "asd": metrics.asd, "assd": metrics.assd}
# medpy's hd95 is the pooled percentile, so it is compared with ours(pooled=True); asd/assd agree as is
MEDPY = {"hd95": medpy_binary.hd95, "asd": medpy_binary.asd, "assd": medpy_binary.assd}
OURS_VS_MEDPY = {"hd95": lambda p, g: metrics.hd95(p, g, pooled=True),
                 "asd": metrics.asd, "assd": metrics.assd}


def timed(fn, pairs, repeat) -> tuple[float, np.ndarray]:
    """Best-of-`repeat` ms per pair, and the values."""
    best = np.inf
    for _ in range(repeat):
        t0 = time.perf_counter()
        values = np.array([fn(p, g) for p, g in pairs])
        best = min(best, (time.perf_counter() - t0) / len(pairs) * 1e3)
    return best, values


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--pairs", type=int, default=100)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    sets = {"lesion": [lesion_pair(rng) for _ in range(args.pairs)],
            "blobs": [blob_pair(rng) for _ in range(args.pairs)]}
    print(f"{args.pairs} pairs of {SIZE}x{SIZE} masks per set, best of {args.repeat}; ms per pair")
    print(f"{'set':7s}{'metric':6s}{'ours':>8s}{'monai':>8s}{'medpy':>8s}{'x monai':>9s}{'x medpy':>9s}"
          f"{'|d| monai':>11s}{'rel monai':>11s}{'|d| medpy':>11s}")
    for set_name, pairs in sets.items():
        for name in ("hd95", "asd", "assd"):
            t_ours, v_ours = timed(OURS[name], pairs, args.repeat)
            t_monai, v_monai = timed(monai_fn(name), pairs, args.repeat)
            t_medpy, v_medpy = timed(MEDPY[name], pairs, args.repeat)
            _, v_ours_medpy = timed(OURS_VS_MEDPY[name], pairs, 1)
            print(f"{set_name:7s}{name:6s}{t_ours:8.3f}{t_monai:8.3f}{t_medpy:8.3f}{t_monai / t_ours:9.1f}"
                  f"{t_medpy / t_ours:9.1f}{np.abs(v_ours - v_monai).max():11.2e}"
                  f"{(np.abs(v_ours - v_monai) / np.maximum(1, np.abs(v_monai))).max():11.2e}"
                  f"{np.abs(v_ours_medpy - v_medpy).max():11.2e}")
    mpd = np.array([metrics.hd95(p, g) - metrics.hd95(p, g, pooled=True) for p, g in sets["blobs"]])
    print(f"hd95 MONAI (directed max) minus medpy (pooled) on blobs: max |diff| {np.abs(mpd).max():.2f} px, "
          f"mean {mpd.mean():.2f} px")


if __name__ == "__main__":
    main()
