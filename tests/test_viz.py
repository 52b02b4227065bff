"""Tests for clip_us/viz.py: Fig. 4 overlay colours, ROC points against scikit-learn, SVG/PNG files."""
import os
import xml.etree.ElementTree as ET

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.metrics import roc_auc_score, roc_curve

from clip_us import viz

SVG = "{http://www.w3.org/2000/svg}"


def _case():
    """4x4 image with one pixel each of TP, FP, FN(gt only) and background in the top row."""
    img = np.full((4, 4), 100, np.uint8)
    img[0] = [40, 80, 120, 160]
    gt = np.zeros((4, 4), np.uint8)
    pred = np.zeros((4, 4), np.uint8)
    gt[0, 0], pred[0, 0] = 1, 1      # TP
    pred[0, 1] = 255                 # FP (any value > 0 is foreground)
    gt[0, 2] = 1                     # FN: ground truth only
    return img, gt, pred


def test_overlay_colours_hand_made_case():
    img, gt, pred = _case()
    out = np.asarray(viz.overlay(img, gt, pred, alpha=0.5)).astype(int)
    assert out.shape == (4, 4, 3)
    blend = lambda g, c: [int(0.5 * g + 0.5 * v + 0.5) for v in c]  # noqa: E731
    assert out[0, 0].tolist() == blend(40, (255, 255, 0))   # TP yellow
    assert out[0, 1].tolist() == blend(80, (0, 255, 0))     # FP green
    assert out[0, 2].tolist() == blend(120, (255, 0, 0))    # FN red
    assert out[0, 3].tolist() == [160, 160, 160]            # background stays gray
    assert (out[1:] == 100).all()


def test_overlay_undoes_clip_normalisation_of_float_tensor():
    img, gt, pred = _case()
    rgb = torch.from_numpy(img).float().div(255).expand(3, 4, 4)  # [3, H, W] in [0, 1]
    mean, std = torch.tensor(viz.CLIP_MEAN)[:, None, None], torch.tensor(viz.CLIP_STD)[:, None, None]
    normed = (rgb - mean) / std
    ref = np.asarray(viz.overlay(img, gt, pred)).astype(int)
    got = np.asarray(viz.overlay(normed, torch.from_numpy(gt), torch.from_numpy(pred),
                                 mean=viz.CLIP_MEAN, std=viz.CLIP_STD)).astype(int)
    assert np.abs(got - ref).max() <= 1
    plain = np.asarray(viz.overlay(rgb, gt, pred)).astype(int)  # float [0, 1], no mean/std
    assert np.abs(plain - ref).max() <= 1
    hwc = np.repeat(img[..., None], 3, axis=-1)                 # uint8 HxWx3
    assert (np.asarray(viz.overlay(hwc, gt, pred)).astype(int) == ref).all()


def test_overlay_rejects_mismatched_mask():
    img, gt, _ = _case()
    with pytest.raises(ValueError, match="pred mask has shape"):
        viz.overlay(img, gt, np.zeros((5, 4)))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_roc_points_match_sklearn_with_ties(seed):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, 200)
    scores = np.round(rng.random(200) + 0.3 * labels, 1)  # rounding makes many ties
    fpr, tpr, thr = viz.roc_curve_points(scores, labels)
    rf, rt, rthr = roc_curve(labels, scores, drop_intermediate=False)
    np.testing.assert_allclose(fpr, rf)
    np.testing.assert_allclose(tpr, rt)
    np.testing.assert_allclose(thr[1:], rthr[1:])
    assert np.isinf(thr[0]) and np.isinf(rthr[0])
    assert viz.auc_trapezoid(fpr, tpr) == pytest.approx(roc_auc_score(labels, scores))


def test_roc_all_tied_and_tensor_input():
    labels = torch.tensor([0, 1, 0, 1])
    fpr, tpr, _ = viz.roc_curve_points(torch.full((4,), 0.5), labels)
    assert fpr.tolist() == [0.0, 1.0] and tpr.tolist() == [0.0, 1.0]


def test_roc_bad_input():
    with pytest.raises(ValueError, match="both classes"):
        viz.roc_curve_points([0.1, 0.2], [1, 1])
    with pytest.raises(ValueError, match="0/1 label"):
        viz.roc_curve_points([0.1, 0.2], [0, 2])


def _no_temp_files(folder):
    return not [f for f in os.listdir(folder) if f.startswith(".tmp-")]


def test_save_roc_svg_is_valid_xml(tmp_path):
    labels, scores = [0, 0, 1, 1, 0, 1], [0.1, 0.4, 0.35, 0.8, 0.2, 0.9]
    path = tmp_path / "roc.svg"
    auc = viz.save_roc_svg(scores, labels, path, title="ROC <busi> & co")
    assert auc == pytest.approx(roc_auc_score(labels, scores))
    root = ET.parse(path).getroot()
    texts = [t.text for t in root.iter(SVG + "text")]
    assert f"ROC (AUC = {auc:.3f})" in texts and "ROC <busi> & co" in texts
    assert len(root.findall(f"{SVG}polyline")) == 2  # diagonal + curve
    assert _no_temp_files(tmp_path)


def test_save_curves_svg(tmp_path):
    series = {"train loss": [(1, 1.0), (2, 0.5), (3, float("nan")), (4, 0.25)],
              "val dice": [(2, 0.3), (4, 0.6)], "empty": []}
    path = tmp_path / "curves.svg"
    viz.save_curves_svg(series, path, "loss", "epoch", "value")
    root = ET.parse(path).getroot()
    lines = root.findall(f"{SVG}polyline")
    assert len(lines) == 2
    assert len(lines[0].get("points").split()) == 3  # the NaN point is skipped
    frame = root.findall(f"{SVG}rect")[1]
    x0, y0 = float(frame.get("x")), float(frame.get("y"))
    x1, y1 = x0 + float(frame.get("width")), y0 + float(frame.get("height"))
    for line in lines:  # every point lies inside the plot frame, extremes on its edges
        pts = np.array([p.split(",") for p in line.get("points").split()], float)
        assert (pts[:, 0] >= x0 - 1e-6).all() and (pts[:, 0] <= x1 + 1e-6).all()
        assert (pts[:, 1] >= y0 - 1e-6).all() and (pts[:, 1] <= y1 + 1e-6).all()
    assert lines[0].get("points").split()[0] == f"{x0:.2f},{y0:.2f}"  # (1, 1.0): left, top
    assert {"train loss", "val dice"} <= {t.text for t in root.iter(SVG + "text")}
    viz.save_curves_svg({"flat": [(0, 1.0), (1, 1.0)]}, tmp_path / "flat.svg", "t", "x", "y")
    ET.parse(tmp_path / "flat.svg")
    with pytest.raises(ValueError, match="no finite points"):
        viz.save_curves_svg({"a": [(0, float("inf"))]}, tmp_path / "bad.svg", "t", "x", "y")
    assert not (tmp_path / "bad.svg").exists() and _no_temp_files(tmp_path)


def test_save_overlay_grid_pairs_and_dicts(tmp_path):
    img, gt, pred = _case()
    tile = viz.overlay(img, gt, pred)
    path = tmp_path / "grid.png"
    viz.save_overlay_grid([(tile, f"case{i} Dice 0.50") for i in range(5)], path, ncols=4)
    with Image.open(path) as sheet:
        assert sheet.format == "PNG" and sheet.width > 4 * 4 and sheet.height > 2 * 4
        px = np.asarray(sheet.convert("RGB"))
    assert (px == np.asarray(tile)[0, 0]).all(axis=-1).any()  # the yellow TP pixel is in the sheet
    rgb = (torch.from_numpy(img).float().div(255).expand(3, 4, 4)
           - torch.tensor(viz.CLIP_MEAN)[:, None, None]) / torch.tensor(viz.CLIP_STD)[:, None, None]
    items = [{"image": rgb, "gt": gt, "pred": pred, "label": "a Dice 0.5"}]
    viz.save_overlay_grid(items, tmp_path / "d.png", normalized=True)
    with Image.open(tmp_path / "d.png") as sheet:
        crop = np.asarray(sheet.convert("RGB"))[4 + 14:4 + 14 + 4, 4:8].astype(int)
    assert np.abs(crop - np.asarray(tile).astype(int)).max() <= 1
    with pytest.raises(ValueError, match="missing"):
        viz.save_overlay_grid([{"image": img}], tmp_path / "e.png")
    assert _no_temp_files(tmp_path)


def test_atomic_write_keeps_old_file_on_failure(tmp_path):
    path = tmp_path / "x.svg"
    path.write_text("old")

    def boom(f):
        f.write(b"partial")
        raise RuntimeError("disk full")
    with pytest.raises(RuntimeError):
        viz._atomic_write(path, boom)
    assert path.read_text() == "old" and _no_temp_files(tmp_path)
