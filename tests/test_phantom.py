"""Phantom: determinism, the lesion descriptors of the ultrasound-CLIP paper (§4.3) as measurable
properties, the BUSI layout on disk, atomic writing, the CLI and speed."""
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from clip_us import phantom
from clip_us.phantom import PhantomConfig, make_sample, write_dataset
from clip_us.phantom import __main__ as phantom_cli


@pytest.fixture(scope="module")
def samples():
    cfg = PhantomConfig(size=256, seed=3, p_second_lesion=0.0)
    return [make_sample(i, cfg) for i in range(40)]


def bbox_hw(mask):
    ys, xs = np.nonzero(mask)
    return np.ptp(ys) + 1, np.ptp(xs) + 1


def test_deterministic_per_seed_and_index():
    cfg = PhantomConfig(size=96, seed=7)
    a, b = make_sample(5, cfg), make_sample(5, cfg)
    assert np.array_equal(a["image"], b["image"]) and np.array_equal(a["mask"], b["mask"])
    assert a["attributes"] == b["attributes"]
    # A sample depends on (seed, index) only, not on the data set size or its neighbours.
    c = make_sample(5, PhantomConfig(size=96, seed=7, n=3))
    assert np.array_equal(a["image"], c["image"])
    # Different seed, or different index: different images; seeds do not overlap by offset.
    assert not np.array_equal(a["image"], make_sample(5, PhantomConfig(size=96, seed=8))["image"])
    assert not np.array_equal(make_sample(1, PhantomConfig(size=96, seed=0))["image"],
                              make_sample(0, PhantomConfig(size=96, seed=1))["image"])


def test_sample_types_and_attributes(samples):
    for s in samples:
        assert s["image"].dtype == np.uint8 and s["image"].shape == (256, 256)
        assert s["mask"].dtype == bool and s["mask"].any()
        assert s["label"] in (0, 1) and s["organ"] in phantom.ORGANS
        assert (s["mask"] <= s["fov"]).all(), "lesions lie inside the field of view"
        for key in ("shape", "margin", "orientation", "echogenicity", "posterior_features",
                    "calcifications", "size_mm", "depth_mm"):
            assert key in s["attributes"]
        assert s["attributes"]["condition"] in s["findings"] or s["attributes"]["shape"] in s["findings"].lower()
    assert {s["label"] for s in samples} == {0, 1}


def test_benign_wider_than_tall_malignant_taller_than_wide(samples):
    for s in samples:
        h, w = bbox_hw(s["mask"])
        assert (w > h) if s["label"] == 0 else (h > w), (s["label"], h, w)


def test_malignant_outline_irregular_benign_smooth(samples):
    def compactness(m):  # perimeter^2 / (4 pi area): 1 for a disc, larger when irregular
        perim = (m & ~ndimage.binary_erosion(m)).sum()
        return perim ** 2 / (4 * np.pi * m.sum())
    ben = np.median([compactness(s["mask"]) for s in samples if s["label"] == 0])
    mal = np.median([compactness(s["mask"]) for s in samples if s["label"] == 1])
    assert mal > 1.3 * ben


def _ring(mask, width):
    return ndimage.binary_dilation(mask, iterations=width) & ~ndimage.binary_dilation(mask, iterations=2)


def test_lesions_hypoechoic_with_class_specific_posterior_features(samples):
    ratios = {0: [], 1: []}
    for s in samples:
        img, m, fov = s["image"].astype(float), s["mask"], s["fov"]
        interior = ndimage.binary_erosion(m, iterations=2)
        ring = _ring(m, 6) & fov
        assert img[interior].mean() < img[ring].mean(), "lesion interior is hypoechoic"
        # Posterior: the band below the lesion against the bands beside it at the same depth.
        ys, xs = np.nonzero(m)
        y0, y1 = ys.max() + 4, min(ys.max() + 30, 255)
        x0, x1 = xs.min(), xs.max() + 1
        w = x1 - x0
        below = img[y0:y1, x0:x1][fov[y0:y1, x0:x1]]
        side = np.concatenate([img[y0:y1, max(0, x0 - w):x0][fov[y0:y1, max(0, x0 - w):x0]],
                               img[y0:y1, x1:x1 + w][fov[y0:y1, x1:x1 + w]]])
        ratios[s["label"]].append(below.mean() / side.mean())
    assert np.median(ratios[0]) > 1.0, "benign: posterior enhancement"
    assert np.median(ratios[1]) < 0.9, "malignant: posterior shadowing"


def test_malignant_calcifications_bright(samples):
    for s in samples:
        has = s["attributes"]["calcifications"] != "none"
        assert has == (s["label"] == 1)
        if has:  # bright points inside the lesion, brighter than the surrounding tissue
            inside = s["image"][s["mask"]]
            assert inside.max() > np.percentile(s["image"][_ring(s["mask"], 6) & s["fov"]], 90)


def test_overlays_outside_field_of_view(samples):
    for s in samples[:10]:
        outside = (s["image"] > 0) & ~s["fov"]
        assert outside.sum() > 200, "text, grey bar, ruler and body marker are drawn outside"
        assert outside[:15].any(), "header text above the field of view"


def test_normal_images_have_no_lesion():
    s = make_sample(0, PhantomConfig(size=96, p_normal=1.0))
    assert s["label"] == 2 and not s["mask"].any() and s["masks"] == []
    assert s["attributes"]["condition"] == "normal"


def test_write_dataset_busi_layout(tmp_path):
    cfg = PhantomConfig(size=64, n=8, seed=1, p_second_lesion=1.0, p_normal=0.25)
    root = write_dataset(tmp_path / "ph", cfg)
    records = [json.loads(line) for line in (root / "metadata.jsonl").read_text().splitlines()]
    assert len(records) == 8
    for rec in records:
        cls = rec["label_name"]
        assert rec["file"].startswith(f"{cls}/{cls} (") and rec["file"].endswith(").png")
        img = np.asarray(Image.open(root / rec["file"]))
        assert img.shape == (64, 64) and img.dtype == np.uint8
        sample = make_sample(rec["index"], cfg)
        assert np.array_equal(img, sample["image"]), "the PNG holds the generated image, losslessly"
        masks = [np.asarray(Image.open(root / m)) for m in rec["masks"]]
        assert all(set(np.unique(m)) <= {0, 255} for m in masks)
        assert np.array_equal(np.logical_or.reduce([m > 0 for m in masks]), sample["mask"])
        if cls != "normal":
            assert rec["masks"][1].endswith("_mask_1.png"), "second lesion as BUSI's _mask_1"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "no temp dir left"


def test_write_dataset_refuses_non_empty_folder(tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not empty"):
        write_dataset(tmp_path / "x", PhantomConfig(size=32, n=2))
    assert [p.name for p in (tmp_path / "x").iterdir()] == ["keep.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["x"], "no temp dir left"


def test_write_dataset_leaves_nothing_on_failure(tmp_path, monkeypatch):
    def boom(*a, **k):
        raise RuntimeError("disk full")
    monkeypatch.setattr(phantom, "_save_png", boom)
    with pytest.raises(RuntimeError):
        write_dataset(tmp_path / "ph", PhantomConfig(size=32, n=2))
    assert list(tmp_path.iterdir()) == []


def test_cli(tmp_path, capsys):
    phantom_cli.main(["--out", str(tmp_path / "cli"), "--n", "3", "--seed", "2", "--size", "64"])
    assert "wrote 3 images" in capsys.readouterr().out
    assert len((tmp_path / "cli" / "metadata.jsonl").read_text().splitlines()) == 3


def test_cli_error_is_one_line_not_a_traceback(tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "keep.txt").write_text("mine")
    done = subprocess.run([sys.executable, "-m", "clip_us.phantom", "--out", str(tmp_path / "x"),
                           "--n", "2", "--size", "32"], cwd=Path(__file__).resolve().parents[1],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert done.stderr.startswith("error: ") and "not empty" in done.stderr.splitlines()[0]


def test_speed_sanity():
    cfg = PhantomConfig(size=256)
    make_sample(0, cfg)
    t = time.perf_counter()
    for i in range(10):
        make_sample(i, cfg)
    ms = (time.perf_counter() - t) * 100
    assert ms < 80, f"{ms:.1f} ms per 256x256 image (goal ~20 ms; generous on a shared machine)"
