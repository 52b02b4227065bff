"""clip_us.metrics against MONAI, medpy and scikit-learn on seeded random data, plus edge cases,
hand-made retrieval/alignment cases and bad inputs."""

import json
import warnings

import numpy as np
import pytest
import torch
from medpy.metric import binary as medpy_binary
from monai.metrics import (
    DiceMetric,
    compute_average_surface_distance,
    compute_dice,
    compute_hausdorff_distance,
    compute_iou,
)
from scipy.ndimage import gaussian_filter
from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, recall_score, roc_auc_score, roc_curve

from clip_us import metrics

# ----------------------------------------------------------------------------- helpers


def blob(rng, shape, sigma=4.0):
    """Thresholded smoothed noise: several components, holes, border contact."""
    x = gaussian_filter(rng.standard_normal(shape), sigma)
    return x > np.quantile(x, rng.uniform(0.6, 0.95))


def batch(m):
    return torch.as_tensor(m)[None, None].float()  # [1, 1, *spatial]: MONAI's batch + channel


def monai_all(p, g, spacing=None):
    """(hd95, directed asd, assd) from MONAI."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # MONAI warns on empty masks
        kw = dict(include_background=True, spacing=spacing)
        return (compute_hausdorff_distance(batch(p), batch(g), percentile=95, **kw).item(),
                compute_average_surface_distance(batch(p), batch(g), **kw).item(),
                compute_average_surface_distance(batch(p), batch(g), symmetric=True, **kw).item())


def ours_all(p, g, spacing=None):
    return metrics.hd95(p, g, spacing), metrics.asd(p, g, spacing=spacing), metrics.assd(p, g, spacing)


def assert_same(ours, ref, rtol):
    """Equal, including nan and inf; MONAI is float32 so its comparison is relative to 1e-6."""
    for a, b in zip(ours, ref):
        if not np.isfinite(b):
            assert (np.isnan(a) and np.isnan(b)) or a == b, (ours, ref)
        else:
            assert abs(a - b) <= rtol * max(1.0, abs(b)), (ours, ref)


def random_pairs(n, shape, seed):
    rng = np.random.default_rng(seed)
    return [(blob(rng, shape), blob(rng, shape)) for _ in range(n)]


# ----------------------------------------------------------------------------- segmentation
@pytest.mark.parametrize("shape,n", [((96, 96), 40), ((20, 24, 28), 6)])
def test_distances_match_monai_and_medpy(shape, n):
    pooled_differs = 0
    for p, g in random_pairs(n, shape, seed=len(shape)):
        ours = ours_all(p, g)
        assert_same(ours, monai_all(p, g), rtol=1e-6)
        pooled = metrics.hd95(p, g, pooled=True)
        assert abs(pooled - medpy_binary.hd95(p, g)) <= 1e-9
        assert abs(ours[1] - medpy_binary.asd(p, g)) <= 1e-9
        assert abs(ours[2] - medpy_binary.assd(p, g)) <= 1e-9
        pooled_differs += abs(ours[0] - pooled) > 0.5
    assert pooled_differs > 0  # the two HD95 definitions really differ on random blobs


def test_percentile_is_numpys():
    rng = np.random.default_rng(4)
    for n in (1, 2, 3, 20, 21, 300):
        d = np.sqrt(rng.integers(0, 5000, n).astype(float))  # distance-like values with ties
        for q in (0, 12.5, 50, 95, 100):
            assert metrics._percentile(d, q) == np.percentile(d, q)


def test_spacing_matches_monai_and_medpy():
    for p, g in random_pairs(8, (64, 48), seed=7):
        assert_same(ours_all(p, g, (0.7, 1.3)), monai_all(p, g, (0.7, 1.3)), rtol=1e-6)
        assert abs(metrics.hd95(p, g, (0.7, 1.3), pooled=True) -
                   medpy_binary.hd95(p, g, voxelspacing=(0.7, 1.3))) <= 1e-9
        assert abs(metrics.assd(p, g, 2.0) - 2.0 * metrics.assd(p, g)) <= 1e-9  # isotropic scales


def edge_cases():
    z = np.zeros((32, 32), bool)
    square = z.copy()
    square[8:20, 10:24] = True
    border = z.copy()
    border[:12, :] = True  # touches three image borders
    pixel = z.copy()
    pixel[16, 16] = True
    corner = z.copy()
    corner[0, 0] = True
    comps = z.copy()
    comps[2:6, 2:6] = comps[20:30, 22:29] = comps[25, 3] = True
    ring = square.copy()
    ring[11:17, 14:20] = False  # a hole
    return {"both empty": (z, z), "pred empty": (z, square), "gt empty": (square, z),
            "border": (border, square), "border both": (border, border | pixel),
            "single pixel pred": (pixel, square), "single pixels": (pixel, corner),
            "components": (comps, square), "holes": (ring, square), "hole vs comps": (comps, ring),
            "identical": (square, square)}


@pytest.mark.parametrize("name", list(edge_cases()))
def test_edge_cases_match_monai(name):
    p, g = edge_cases()[name]
    ours = ours_all(p, g)
    assert_same(ours, monai_all(p, g), rtol=1e-6)
    if p.any() and g.any():  # medpy raises on empty masks
        assert abs(metrics.hd95(p, g, pooled=True) - medpy_binary.hd95(p, g)) <= 1e-9
        assert abs(ours[2] - medpy_binary.assd(p, g)) <= 1e-9


def test_edge_case_values_are_documented():
    cases = edge_cases()
    assert all(np.isnan(v) for v in ours_all(*cases["both empty"]))
    for name in ("pred empty", "gt empty"):  # MONAI: hd95 nan (quantile of infs), asd/assd inf
        hd, a, s = ours_all(*cases[name])
        assert np.isnan(hd) and a == s == np.inf
    assert ours_all(*cases["identical"]) == (0.0, 0.0, 0.0)
    assert metrics.hd95(*cases["single pixels"]) == pytest.approx(16 * np.sqrt(2))


@pytest.mark.parametrize("ignore_empty", [True, False])
def test_dice_iou_match_monai(ignore_empty):
    pairs = random_pairs(10, (40, 40), seed=3) + [v for k, v in edge_cases().items()]
    for p, g in pairs:
        ref_d = compute_dice(batch(p), batch(g), include_background=True, ignore_empty=ignore_empty).item()
        ref_i = compute_iou(batch(p), batch(g), include_background=True, ignore_empty=ignore_empty).item()
        assert_same((metrics.dice(p, g, ignore_empty), metrics.iou(p, g, ignore_empty)), (ref_d, ref_i), 1e-6)


def test_dice_per_image_is_monai_per_item_and_the_batch_is_one_volume():
    pairs = random_pairs(6, (40, 40), seed=4)
    pairs[2] = (pairs[2][0], np.zeros((40, 40), bool))          # an empty gt: nan, then dropped
    pairs[4] = (np.zeros((40, 40), bool), pairs[4][1])          # an empty prediction: 0
    p, g = np.stack([a for a, _ in pairs]), np.stack([b for _, b in pairs])
    ours = metrics.dice_per_image(torch.as_tensor(p), g)
    items = [torch.as_tensor(m)[:, None].float() for m in (p, g)]  # [B, 1, H, W]: MONAI's items
    ref = DiceMetric(include_background=True, reduction="none")(*items).reshape(-1).numpy()
    assert ours.shape == ref.shape == (6,) and np.isnan(ours[2]) and ours[4] == 0
    assert_same(ours, ref, 1e-6)
    one_by_one = [metrics.dice(a, b) for a, b in pairs]
    np.testing.assert_array_equal(ours, one_by_one)                 # nan at the same place
    per_image_mean = metrics.summarize(ours)                        # how train_seg.py averages
    assert per_image_mean["n_dropped"] == 1
    assert per_image_mean["mean"] == pytest.approx(np.nanmean(one_by_one))
    assert abs(metrics.dice(p, g) - per_image_mean["mean"]) > 1e-3   # [B, H, W] to dice(): one volume
    with pytest.raises(ValueError, match="batches"):
        metrics.dice_per_image(p[0], g[0])


def test_torch_and_integer_inputs_equal_numpy():
    p, g = random_pairs(1, (48, 40), seed=5)[0]
    ref = ours_all(p, g)
    assert ours_all(torch.as_tensor(p), torch.as_tensor(g)) == ref
    assert ours_all(torch.as_tensor(p).float(), g.astype(np.uint8)) == ref
    assert metrics.dice(torch.as_tensor(p), g) == metrics.dice(p, g)


def test_crop_is_exact_under_padding():
    """Placing the pair in a larger canvas (or at the border) changes nothing but border contact."""
    p, g = random_pairs(1, (30, 30), seed=9)[0]
    big_p, big_g = np.zeros((100, 90), bool), np.zeros((100, 90), bool)
    big_p[40:70, 30:60], big_g[40:70, 30:60] = p, g
    p2, g2 = np.pad(p, 1), np.pad(g, 1)  # same objects, no border contact
    assert ours_all(big_p, big_g) == ours_all(p2, g2)


def test_bad_segmentation_inputs_raise():
    m = np.zeros((8, 8), bool)
    with pytest.raises(ValueError, match="binary mask"):
        metrics.hd95(np.full((8, 8), 0.3), m)
    with pytest.raises(ValueError, match="same shape"):
        metrics.dice(m, np.zeros((8, 9), bool))
    with pytest.raises(ValueError, match="2-D or 3-D"):
        metrics.asd(np.zeros((2, 1, 8, 8), bool), np.zeros((2, 1, 8, 8), bool))
    with pytest.raises(ValueError, match="spacing"):
        metrics.hd95(m, m, spacing=(1.0, -1.0))
    with pytest.raises(ValueError, match="percentile"):
        metrics.hd95(m, m, percentile=150)


def test_segmentation_report_drops_and_counts_non_finite():
    cases = edge_cases()
    preds = [cases[k][0] for k in ("identical", "border", "both empty", "pred empty")]
    gts = [cases[k][1] for k in ("identical", "border", "both empty", "pred empty")]
    report = metrics.segmentation_report(preds, gts)
    json.dumps(report, allow_nan=False)  # JSON-ready: no nan or inf anywhere
    hd = [metrics.hd95(p, g) for p, g in zip(preds[:2], gts[:2])]
    assert report["hd95"] == {"mean": np.mean(hd), "std": np.std(hd), "n": 2, "n_dropped": 2}
    assert report["dice"]["n_dropped"] == 1  # empty gt only; the empty prediction has dice 0
    assert set(report) == set(metrics.SEG_METRICS)
    # the dict form (per-image values already computed) gives the same summary
    values = {"hd95": [metrics.hd95(p, g) for p, g in zip(preds, gts)]}
    assert metrics.segmentation_report(values)["hd95"] == report["hd95"]
    assert metrics.segmentation_report({"x": [np.nan]})["x"] == {"mean": None, "std": None, "n": 0,
                                                                 "n_dropped": 1}
    with pytest.raises(ValueError, match="predictions"):
        metrics.segmentation_report(preds, gts[:2])


# ----------------------------------------------------------------------------- classification
def test_roc_auc_matches_sklearn_with_ties():
    rng = np.random.default_rng(0)
    for trial in range(20):
        n = rng.integers(5, 200)
        labels = rng.integers(0, 2, n)
        labels[:2] = (0, 1)
        scores = np.round(rng.random(n) + 0.3 * labels, 1)  # coarse: many ties, across classes too
        assert abs(metrics.roc_auc(scores, labels) - roc_auc_score(labels, scores)) <= 1e-12
    assert metrics.roc_auc([0.5, 0.5, 0.5], [0, 1, 1]) == 0.5
    assert metrics.roc_auc(torch.tensor([0.1, 0.9]), torch.tensor([0, 1])) == 1.0


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_roc_curve_matches_sklearn_with_ties(seed):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, 200)
    scores = np.round(rng.random(200) + 0.3 * labels, 1)  # rounding makes many ties
    fpr, tpr, thr = metrics.roc_curve(scores, labels)
    rf, rt, rthr = roc_curve(labels, scores, drop_intermediate=False)
    np.testing.assert_allclose(fpr, rf)
    np.testing.assert_allclose(tpr, rt)
    np.testing.assert_allclose(thr[1:], rthr[1:])
    assert np.isinf(thr[0]) and np.isinf(rthr[0])
    area = float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2))
    assert area == pytest.approx(metrics.roc_auc(scores, labels), abs=1e-12)


def test_roc_curve_all_tied_tensors_and_bad_input():
    fpr, tpr, _ = metrics.roc_curve(torch.full((4,), 0.5), torch.tensor([0, 1, 0, 1]))
    assert fpr.tolist() == [0.0, 1.0] and tpr.tolist() == [0.0, 1.0]
    with pytest.raises(ValueError, match="only one class"):
        metrics.roc_curve([0.1, 0.2], [1, 1])
    with pytest.raises(ValueError, match="labels must be 0"):
        metrics.roc_curve([0.1, 0.2], [0, 2])
    with pytest.raises(ValueError, match="2 scores but 3 labels"):
        metrics.roc_curve([0.1, 0.2], [0, 1, 1])


def test_roc_auc_errors():
    with pytest.raises(ValueError, match="one class"):
        metrics.roc_auc([0.1, 0.2], [1, 1])
    with pytest.raises(ValueError, match="labels must be 0"):
        metrics.roc_auc([0.1, 0.2], [0, 2])
    with pytest.raises(ValueError, match="finite"):
        metrics.roc_auc([0.1, np.nan], [0, 1])


def test_binary_report_matches_sklearn():
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 2, 300)
    probs = np.clip(rng.random(300) * 0.8 + 0.2 * labels, 0, 1)
    probs[:3] = 0.5  # exactly at the threshold: predicted benign (strict >)
    for threshold in (0.5, 0.3):
        pred = (probs > threshold).astype(int)
        r = metrics.binary_report(probs, labels, threshold)
        assert r["confusion_matrix"] == confusion_matrix(labels, pred).tolist()
        assert r["acc"] == pytest.approx(accuracy_score(labels, pred), abs=1e-12)
        assert r["sensitivity"] == pytest.approx(recall_score(labels, pred), abs=1e-12)
        assert r["specificity"] == pytest.approx(recall_score(labels, pred, pos_label=0), abs=1e-12)
        assert r["f1"] == pytest.approx(f1_score(labels, pred), abs=1e-12)
        assert r["auc"] == pytest.approx(roc_auc_score(labels, probs), abs=1e-12)
        json.dumps(r, allow_nan=False)
    assert metrics.accuracy([1, 0, 1, 1], [1, 1, 1, 0]) == 0.5


def test_bootstrap_ci():
    rng = np.random.default_rng(2)
    x = rng.normal(3.0, 1.0, 2000)
    ci = metrics.bootstrap_ci(np.mean, x, n=400, seed=0)
    half = 1.96 / np.sqrt(len(x))
    assert ci["value"] == pytest.approx(x.mean())
    assert ci["low"] == pytest.approx(x.mean() - half, abs=0.3 * half)
    assert ci["high"] == pytest.approx(x.mean() + half, abs=0.3 * half)
    assert metrics.bootstrap_ci(np.mean, x, n=50, seed=1) == metrics.bootstrap_ci(np.mean, x, n=50, seed=1)
    # AUC on a small unbalanced set: stratified resampling keeps both classes in every resample
    labels = np.array([1, 0, 0, 0, 0, 0, 0, 0, 0, 0])
    scores = rng.random(10)
    ci = metrics.bootstrap_ci(metrics.roc_auc, scores, labels, n=200, seed=0, strata=labels)
    assert 0 <= ci["low"] <= ci["value"] <= ci["high"] <= 1
    with pytest.raises(ValueError, match="one class"):  # without strata a one-class resample raises
        metrics.bootstrap_ci(metrics.roc_auc, scores, labels, n=200, seed=0)


# ----------------------------------------------------------------------------- retrieval / alignment
def unit(x):
    x = np.asarray(x, dtype=np.float64)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_strict_retrieval_hand_made():
    img = np.eye(4)
    assert set(metrics.strict_retrieval(img, img, ks=(1,)).values()) == {1.0}
    # text i = e_{i+1} + 0.5 e_i: image i's best text is text i-1, its own text is second
    txt = unit(np.roll(np.eye(4), 1, axis=1) + 0.5 * np.eye(4))
    r = metrics.strict_retrieval(img, txt, ks=(1, 2, 3))
    assert (r["strict_i2t_R@1"], r["strict_i2t_R@2"], r["strict_t2i_R@1"], r["strict_t2i_R@2"]) == \
        (0.0, 1.0, 0.0, 1.0)
    assert r["strict_i2t_mean_rank"] == r["strict_t2i_mean_rank"] == 2.0
    # collapsed embeddings: every candidate ties, and ties fall in column order (row i at i)
    same = unit(np.ones((5, 3)))
    assert metrics.strict_retrieval(same, same, ks=(1, 5))["strict_i2t_R@1"] == 0.2
    assert metrics.strict_retrieval(same, same, ks=(1, 5))["strict_t2i_R@5"] == 1.0


def test_dup_retrieval_counts_identical_captions_and_chunks():
    img = unit([[1, 0, 0], [0.9, 0.1, 0], [0, 1, 0], [0, 0, 1]])
    caption_vec = unit([[1, 0, 0], [0, 1, 0], [0, 0, 1]])
    txt = caption_vec[[0, 0, 1, 2]]  # images 0 and 1 share one caption string
    strict = metrics.strict_retrieval(img, txt, ks=(1,))
    assert strict["strict_i2t_R@1"] == 0.75  # texts 0 and 1 tie: image 1 ranks text 0 first
    dup = metrics.dup_retrieval(img, txt, ["a", "a", "b", "c"], ks=(1,))
    assert dup == {"dup_i2t_R@1": 1.0, "dup_t2i_R@1": 1.0, "dup_i2t_mean_rank": 1.0,
                   "dup_t2i_mean_rank": 1.0}
    rng = np.random.default_rng(0)
    a, b = unit(rng.normal(size=(50, 8))), unit(rng.normal(size=(50, 8)))
    assert metrics.strict_retrieval(a, b, chunk=7) == metrics.strict_retrieval(a, b)
    assert metrics.dup_retrieval(a, b, list("ab") * 25, chunk=7) == metrics.dup_retrieval(a, b, list("ab") * 25)


def test_alignment_scores():
    img = unit([[1, 0], [0, 1], [1, 1]])
    txt = unit([[1, 0], [1, 0], [1, 1]])
    s = img @ txt.T
    r = metrics.alignment_scores(torch.as_tensor(img), txt)
    assert r["paired"] == pytest.approx(np.trace(s) / 3)
    assert r["cross"] == pytest.approx((s.sum() - np.trace(s)) / 6)
    assert r["gap"] == pytest.approx(r["paired"] - r["cross"])
    collapsed = metrics.alignment_scores(unit(np.ones((4, 3))), unit(np.ones((4, 3))))
    assert collapsed["paired"] == pytest.approx(1.0) and collapsed["gap"] == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ValueError, match="L2-normalised"):
        metrics.alignment_scores(img * 2, txt)
    with pytest.raises(ValueError, match="paired"):
        metrics.alignment_scores(img, txt[:2])
