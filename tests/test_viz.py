"""Tests for clip_us/viz.py: Fig. 4 overlay colours, the overlay grid, ROC and training-curve SVGs."""
import os
import xml.etree.ElementTree as ET

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.metrics import roc_auc_score

from clip_us import transform, viz

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
    mean, std = torch.tensor(transform.CLIP_MEAN)[:, None, None], torch.tensor(transform.CLIP_STD)[:, None, None]
    normed = (rgb - mean) / std
    ref = np.asarray(viz.overlay(img, gt, pred)).astype(int)
    got = np.asarray(viz.overlay(normed, torch.from_numpy(gt), torch.from_numpy(pred),
                                 mean=transform.CLIP_MEAN, std=transform.CLIP_STD)).astype(int)
    assert np.abs(got - ref).max() <= 1
    plain = np.asarray(viz.overlay(rgb, gt, pred)).astype(int)  # float [0, 1], no mean/std
    assert np.abs(plain - ref).max() <= 1
    hwc = np.repeat(img[..., None], 3, axis=-1)                 # uint8 HxWx3
    assert (np.asarray(viz.overlay(hwc, gt, pred)).astype(int) == ref).all()


def test_overlay_rejects_mismatched_mask():
    img, gt, _ = _case()
    with pytest.raises(ValueError, match="pred mask has shape"):
        viz.overlay(img, gt, np.zeros((5, 4)))


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


def _block(px, colour):
    """Bounding box (top, bottom, left, right) of the pixels of exactly `colour` in an RGB array."""
    ys, xs = np.nonzero((px == np.asarray(colour)).all(axis=-1))
    return ys.min(), ys.max(), xs.min(), xs.max()


def test_save_overlay_grid_enlarges_sorts_and_has_a_legend(tmp_path):
    img, gt, pred = _case()
    tile = viz.overlay(img, gt, pred)
    marker = Image.new("RGB", (4, 4), (1, 2, 3))  # a colour no overlay or text produces
    names = ["case_22", "case_4", "case_36", "case_23"]
    pairs = [(marker if n == "case_4" else tile, f"{n} Dice 0.50") for n in names]
    path = tmp_path / "grid.png"
    viz.save_overlay_grid(pairs, path, ncols=4, min_panel=64)
    with Image.open(path) as sheet:
        assert sheet.format == "PNG"
        px = np.asarray(sheet.convert("RGB"))
    top, bottom, left, right = _block(px, (1, 2, 3))
    assert (bottom - top + 1, right - left + 1) == (64, 64)    # 4 px panel enlarged 16x
    others = np.nonzero((px == np.asarray(tile)[0, 0]).all(axis=-1))[1]  # TP yellow pixels
    assert left < others.min()                                  # case_4 comes first, not last
    assert px.shape[1] > 4 * 64
    legend = px[:top]                                           # the strip above the panels
    for colour in (viz.RED, viz.GREEN, viz.YELLOW):
        assert (legend == np.asarray(colour)).all(axis=-1).sum() >= 16  # a swatch, not a stray pixel
    viz.save_overlay_grid(pairs, tmp_path / "asis.png", ncols=4, min_panel=64, sort=False)
    with Image.open(tmp_path / "asis.png") as sheet:
        assert _block(np.asarray(sheet.convert("RGB")), (1, 2, 3))[2] > left  # given order kept
    assert _no_temp_files(tmp_path)


def test_natural_key_orders_numbers_by_value():
    names = ["case_38", "case_4", "case_22", "Case_23", "case_47", "case_36", "b", "a10", "a9"]
    assert sorted(names, key=viz.natural_key) == ["a9", "a10", "b", "case_4", "case_22", "Case_23",
                                                  "case_36", "case_38", "case_47"]


def test_save_overlay_grid_dicts_undo_normalisation(tmp_path):
    img, gt, pred = _case()
    tile = np.asarray(viz.overlay(img, gt, pred)).astype(int)
    rgb = (torch.from_numpy(img).float().div(255).expand(3, 4, 4)
           - torch.tensor(transform.CLIP_MEAN)[:, None, None]) / torch.tensor(transform.CLIP_STD)[:, None, None]
    items = [{"image": rgb, "gt": gt, "pred": pred, "label": "a Dice 0.5"}]
    viz.save_overlay_grid(items, tmp_path / "d.png", normalized=True, min_panel=4)
    with Image.open(tmp_path / "d.png") as sheet:
        px = np.asarray(sheet.convert("RGB")).astype(int)
    top, _, left, _ = _block(px, tile[0, 0])                     # the TP pixel, yellow over gray
    assert np.abs(px[top:top + 4, left:left + 4] - tile).max() <= 1
    with pytest.raises(ValueError, match="missing"):
        viz.save_overlay_grid([{"image": img}], tmp_path / "e.png")
    with pytest.raises(ValueError, match="no images"):
        viz.save_overlay_grid([], tmp_path / "e.png")
    assert _no_temp_files(tmp_path)


def _log(seeds=(1, 2), epochs=6, every=2):
    """log.jsonl records as the training loop writes them, plus a test record."""
    recs = []
    for s in seeds:
        for e in range(1, epochs + 1):
            r = {"seed": s, "epoch": e, "loss": 1.0 / e + 0.1 * s, "lr": 1e-4}
            if e % every == 0:
                r["val"] = {"dice": {"mean": 0.1 * e / s, "std": 0.0, "n_dropped": 0}, "iou": {}}
            recs.append(r)
        recs.append({"seed": s, "test": {"dice": {"mean": 0.5}}})
    return recs


def test_training_curves_loss_beside_validation(tmp_path):
    path = tmp_path / "loss.svg"
    viz.save_training_curves(_log(), path, "dice", "Dice-CE", "Dice", title="phantom")
    root = ET.parse(path).getroot()
    assert float(root.get("width")) == 2 * viz.W                # two panels side by side
    lines = root.findall(f"{SVG}polyline")
    assert [len(ln.get("points").split()) for ln in lines] == [6, 6, 3, 3]  # loss, loss, val, val
    xs = [float(p.split(",")[0]) for ln in lines[2:] for p in ln.get("points").split()]
    assert min(xs) >= viz.W                                     # validation sits in the right panel
    assert lines[0].get("stroke") == lines[2].get("stroke")     # one colour per seed
    assert len(root.findall(f"{SVG}circle")) == 6               # a dot per validation
    texts = {t.text for t in root.iter(SVG + "text")}
    assert {"Dice-CE", "validation Dice", "seed 1", "seed 2", "phantom training"} <= texts
    first = [tuple(map(float, p.split(","))) for p in lines[2].get("points").split()]
    assert first[0][1] > first[-1][1]                           # val Dice rises: y goes up the page


def test_epoch_axis_has_whole_numbers_only(tmp_path):
    recs = [{"epoch": e, "loss": 1.0 / e, "val": {"dice": 0.1 * e}} for e in (1, 2, 3)]
    viz.save_training_curves(recs, tmp_path / "e.svg", "dice")
    texts = [t.text for t in ET.parse(tmp_path / "e.svg").getroot().iter(SVG + "text")]
    assert "1.5" not in texts and "2.5" not in texts and {"1", "2", "3"} <= set(texts)
    assert any(v != int(v) for v in viz._nice_ticks(0, 1))       # other axes keep fractions


def test_training_curves_plain_numbers_and_no_validation(tmp_path):
    recs = [{"epoch": 1, "loss": 0.9, "val": {"acc": 0.5}}, {"epoch": 2, "loss": 0.7},
            {"epoch": 3, "loss": 0.6, "val": {"acc": 0.75, "auc": None}}]
    viz.save_training_curves(recs, tmp_path / "a.svg", "acc")
    lines = ET.parse(tmp_path / "a.svg").getroot().findall(f"{SVG}polyline")
    assert [len(ln.get("points").split()) for ln in lines] == [3, 2]
    viz.save_training_curves(recs, tmp_path / "b.svg", "auc")   # no finite AUC: a note, no curve
    root = ET.parse(tmp_path / "b.svg").getroot()
    assert len(root.findall(f"{SVG}polyline")) == 1
    assert any("no finite validation auc" in (t.text or "") for t in root.iter(SVG + "text"))
    with pytest.raises(ValueError, match="no finite training loss"):
        viz.save_training_curves([{"seed": 1, "test": {}}], tmp_path / "c.svg", "dice")
    assert not (tmp_path / "c.svg").exists() and _no_temp_files(tmp_path)


def test_failed_write_keeps_old_file(tmp_path, monkeypatch):
    path = tmp_path / "grid.png"
    path.write_bytes(b"old")

    def boom(self, fp, format=None, **kw):
        with open(fp, "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")
    monkeypatch.setattr(Image.Image, "save", boom)
    img, gt, pred = _case()
    with pytest.raises(OSError, match="disk full"):
        viz.save_overlay_grid([{"image": img, "gt": gt, "pred": pred}], path)
    assert path.read_bytes() == b"old" and _no_temp_files(tmp_path)
