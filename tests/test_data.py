"""data.py: every layout from a phantom-made fixture, the overlay crop, image/mask alignment
through augmentation, splits, and every bad input of issue 5."""
import json
import random
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from clip_us import data
from clip_us.data import DataConfig, DataError, build_datasets, imaging_box, read_gray
from clip_us.phantom import PhantomConfig, make_sample, write_dataset
from clip_us.transform import CLIP_MEAN, CLIP_STD

S = 48   # output size for the tests


@pytest.fixture(scope="module")
def busi(tmp_path_factory) -> Path:
    """A BUSI folder: 30 images, a second lesion (`_mask_1`) on about a third of them."""
    root = tmp_path_factory.mktemp("d") / "busi"
    return write_dataset(root, PhantomConfig(size=128, n=30, seed=0, p_second_lesion=0.3))


def copy(src: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(src, tmp_path / src.name))


def cfg(root, **kw) -> DataConfig:
    kw.setdefault("dataset", "busi")
    kw.setdefault("size", S)
    return DataConfig(root=str(root), **kw)


def records(root: Path) -> list[dict]:
    return [json.loads(x) for x in (root / "metadata.jsonl").read_text().splitlines()]


def write_flat(root: Path, recs, src: Path, images="images", masks="masks", suffix="") -> None:
    """Images and (union) masks of BUSI records as <images>/<name>.png, <masks>/<name><suffix>.png."""
    (root / images).mkdir(parents=True, exist_ok=True)
    (root / masks).mkdir(parents=True, exist_ok=True)
    for r in recs:
        name = f"case{r['index']:03d}"
        shutil.copy(src / r["file"], root / images / f"{name}.png")
        union = np.logical_or.reduce([np.asarray(Image.open(src / m)) > 0 for m in r["masks"]])
        Image.fromarray(union.astype(np.uint8) * 255).save(root / masks / f"{name}{suffix}.png")


# ----------------------------------------------------------------------------- layouts
def test_busi_seg_union_of_masks(busi):
    train, val, test, info = build_datasets(cfg(busi, task="seg"))
    assert len(train) + len(val) + len(test) == 30 and info["health"]["skipped_bad"] == 0
    two = [it for ds in (train, val, test) for it in ds.items if len(it.masks) == 2]
    assert two, "fixture has images with _mask and _mask_1"
    it = two[0]
    union, _ = data.read_mask(it.masks, read_gray(it.image).shape, it.image)
    rec = next(r for r in records(busi) if busi / r["file"] == it.image)
    assert np.array_equal(union, make_sample(rec["index"], PhantomConfig(size=128, seed=0,
                                                                         p_second_lesion=0.3))["mask"])
    x = train[0]
    assert x["image"].shape == (3, S, S) and x["image"].dtype == torch.float32
    assert x["mask"].shape == (S, S) and x["mask"].dtype == torch.long
    assert set(x["mask"].unique().tolist()) <= {0, 1} and x["label"] in (0, 1)
    raw = build_datasets(cfg(busi, task="seg", clip_norm=False))[0][0]["image"]
    assert torch.equal(raw[0], raw[1]) and torch.equal(raw[0], raw[2]), "grayscale repeated to 3 channels"


def test_busi_without_masks_classifies_but_cannot_segment(busi, tmp_path):
    root = copy(busi, tmp_path)
    for m in root.glob("*/*_mask*.png"):
        m.unlink()
    train, val, test, info = build_datasets(cfg(root, task="cls"))
    assert len(train) + len(val) + len(test) == 30 and "mask" not in train[0]
    with pytest.raises(DataError, match=r"benign \(1\)\.png: no mask"):
        build_datasets(cfg(root, task="seg"))


def test_busi_normal_excluded_by_default_kept_as_class_2(tmp_path):
    root = write_dataset(tmp_path / "n", PhantomConfig(size=64, n=20, seed=1, p_normal=0.4))
    n_normal = len(list((root / "normal").glob("* ([0-9]).png")) + list((root / "normal").glob("* ([0-9][0-9]).png")))
    assert n_normal > 0
    sets = build_datasets(cfg(root, task="cls"))[:3]
    assert sum(len(s) for s in sets) == 20 - n_normal
    sets = build_datasets(cfg(root, task="cls", keep_normal=True))[:3]
    labels = [it.label for s in sets for it in s.items]
    assert labels.count(2) == n_normal and len(labels) == 20


def make_nextgen(root: Path, busi: Path, name: str, parts=("train", "val", "test")) -> list:
    """all/images, all/masks, segmentation/<name>/*.txt, classification/<name>/labels.csv+txt."""
    recs = records(busi)
    write_flat(root / "all", recs, busi)
    names = [f"case{r['index']:03d}.png" for r in recs]
    cuts = {"train": names[:20], "val": names[20:25], "test": names[25:]}
    if "val" not in parts:
        cuts = {"train": names[:24], "test": names[24:]}
    for kind in ("segmentation", "classification"):
        (root / kind / name).mkdir(parents=True)
        for p in parts:
            (root / kind / name / f"{p}.txt").write_text("\n".join(cuts[p]) + "\n")
    rows = [f"{n},{r['label']}" for n, r in zip(names, recs)]  # no header, as the release
    (root / "classification" / name / "labels.csv").write_text("\n".join(rows) + "\n")
    return cuts


@pytest.mark.parametrize("task", ["seg", "cls"])
def test_nextgen_release_uses_its_split_files(busi, tmp_path, task):
    cuts = make_nextgen(tmp_path / "ng", busi, "BUSI")
    train, val, test, info = build_datasets(cfg(tmp_path / "ng", dataset="nextgen", task=task))
    for ds, part in ((train, "train"), (val, "val"), (test, "test")):
        assert [Path(it.key).name for it in ds.items] == cuts[part]
    assert info["split"] == "predefined train/val/test"
    labels = {r["index"]: r["label"] for r in records(busi)}
    assert all(it.label == labels[int(it.image.stem[4:])] for it in train.items)
    assert ("mask" in train[0]) == (task == "seg")


def test_nextgen_needs_a_name_when_ambiguous(busi, tmp_path):
    make_nextgen(tmp_path / "ng", busi, "BUSI")
    (tmp_path / "ng" / "segmentation" / "DDTI").mkdir()
    with pytest.raises(DataError, match="nextgen_name"):
        build_datasets(cfg(tmp_path / "ng", dataset="nextgen"))
    assert len(build_datasets(cfg(tmp_path / "ng", dataset="nextgen", nextgen_name="BUSI"))[0]) == 20


def test_prostate_keeps_test_and_splits_train_8_2(busi, tmp_path):
    cuts = make_nextgen(tmp_path / "ng", busi, "Prostate", parts=("train", "test"))
    train, val, test, info = build_datasets(cfg(tmp_path / "ng", dataset="prostate"))
    assert [Path(it.key).name for it in test.items] == cuts["test"]
    assert len(train) + len(val) == 24 and 4 <= len(val) <= 6
    assert {Path(it.key).name for it in train.items + val.items} == set(cuts["train"])


def test_tn3k_keeps_test_and_splits_trainval_8_2(busi, tmp_path):
    recs = records(busi)
    root = tmp_path / "tn3k"
    write_flat(root, recs[:22], busi, "trainval-image", "trainval-mask")
    write_flat(root, recs[22:], busi, "test-image", "test-mask")
    train, val, test, info = build_datasets(cfg(root, dataset="tn3k"))
    assert sorted(it.image.parent.name for it in test.items) == ["test-image"] * 8
    assert len(train) == 18 and len(val) == 4 and info["split"].startswith("predefined test")
    assert all(it.label == -1 for it in train.items), "TN3K has no class labels"
    with pytest.raises(DataError, match="no labels.csv"):
        build_datasets(cfg(root, dataset="tn3k", task="cls"))


def test_folder_layout_with_labels_by_name_or_index(busi, tmp_path):
    recs = records(busi)
    root = tmp_path / "ddti"
    write_flat(root, recs, busi, suffix="_mask")          # masks/<stem>_mask.png also matches
    rows = ["image,label"] + [f"case{r['index']:03d}.png," + (r["label_name"].upper() if i % 2 else str(r["label"]))
                              for i, r in enumerate(recs)]
    (root / "labels.csv").write_text("\n".join(rows) + "\n")
    for dataset in ("ddti", "folder"):
        train, val, test, _ = build_datasets(cfg(root, dataset=dataset, task="cls"))
        truth = {f"case{r['index']:03d}": r["label"] for r in recs}
        assert all(it.label == truth[it.image.stem] for ds in (train, val, test) for it in ds.items)
    train, _, _, _ = build_datasets(cfg(root, dataset="ddti", task="seg"))
    assert train[0]["mask"].sum() > 0


def test_phantom_option_generates_once(tmp_path):
    c = DataConfig(dataset="phantom", root=str(tmp_path / "ph"), size=S, phantom_n=20, phantom_size=64)
    train, val, test, info = build_datasets(c)
    assert len(train) + len(val) + len(test) == 20
    meta = tmp_path / "ph" / "metadata.jsonl"
    stamp = meta.stat().st_mtime_ns
    build_datasets(c)
    assert meta.stat().st_mtime_ns == stamp, "an existing phantom is read, not rewritten"


def test_phantom_default_root_is_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("CLIP_US_CACHE", str(tmp_path))
    c = DataConfig(dataset="phantom", size=S, phantom_n=20, phantom_size=64)
    _, _, _, info = build_datasets(c)
    assert Path(info["root"]).parent == tmp_path / "phantom"


# ----------------------------------------------------------------------------- preprocessing
def test_crop_keeps_lesion_and_drops_overlays():
    pcfg = PhantomConfig(size=256, seed=11)
    for i in range(12):
        s = make_sample(i, pcfg)
        t, b, l, r = imaging_box(s["image"])
        ys, xs = np.nonzero(s["fov"])
        # The box is the field of view's box, give or take the opening's rounding.
        assert abs(t - ys.min()) <= 3 and abs(b - ys.max() - 1) <= 3
        assert abs(l - xs.min()) <= 3 and abs(r - xs.max() - 1) <= 3
        assert s["mask"][t:b, l:r].sum() == s["mask"].sum(), "the lesion is kept whole"
        overlay = (s["image"] > 0) & ~s["fov"]
        assert overlay.sum() > 200 and overlay[t:b, l:r].sum() == 0, "overlays are cut away"


def test_crop_handles_plain_and_dark_images():
    assert imaging_box(np.full((40, 60), 120, np.uint8)) == (0, 40, 0, 60)
    assert imaging_box(np.zeros((40, 60), np.uint8)) == (0, 40, 0, 60)
    img = np.zeros((600, 800), np.uint8)       # large image: boxed at reduced resolution
    img[100:500, 200:700] = 150
    img[10:14, 10:300] = 255                   # a text-like thin stroke
    t, b, l, r = imaging_box(img)
    assert abs(t - 100) <= 3 and abs(b - 500) <= 3 and abs(l - 200) <= 3 and abs(r - 700) <= 3


def test_dataset_output_is_cropped_and_normalised(busi):
    train, _, test, _ = build_datasets(cfg(busi, clip_norm=False, size=64))
    it = test.items[0]
    x = test[0]["image"]
    assert 0 <= x.min() and x.max() <= 1
    gray = read_gray(it.image)
    t, b, l, r = imaging_box(gray)
    ref = np.asarray(Image.fromarray(gray[t:b, l:r]).resize((64, 64), Image.Resampling.BICUBIC))
    assert torch.allclose(x[0], torch.from_numpy(ref / 255.0).float(), atol=1e-6)
    y = build_datasets(cfg(busi, size=64))[2][0]["image"]
    mean, std = torch.tensor(CLIP_MEAN).view(3, 1, 1), torch.tensor(CLIP_STD).view(3, 1, 1)
    assert torch.allclose(y, (x - mean) / std, atol=1e-5)


def test_decoding_modes(tmp_path):
    g = np.tile(np.arange(0, 250, 5, dtype=np.uint8), (10, 1))      # 10 x 50 ramp
    Image.fromarray(g).save(tmp_path / "l.png")
    Image.fromarray(g).convert("RGB").save(tmp_path / "rgb.png")
    Image.fromarray(g).convert("RGBA").save(tmp_path / "rgba.png")
    Image.fromarray(g).convert("P").save(tmp_path / "p.png")
    Image.fromarray(g.astype(np.uint16) * 257).save(tmp_path / "i16.png")
    Image.fromarray(g.astype(np.uint16) * 16).save(tmp_path / "i12.png")     # 12-bit data
    for name in ("l", "rgb", "rgba", "p", "i16", "i12"):
        out = read_gray(tmp_path / f"{name}.png")
        assert out.dtype == np.uint8 and out.shape == (10, 50)
        assert np.abs(out.astype(int) - g).max() <= 1, name


# ----------------------------------------------------------------------------- augmentation
def two_level_fixture(root: Path, n=6, size=64) -> Path:
    """Images whose lesion pixels are 220 and background 40 (no black border, so no crop)."""
    rng = np.random.default_rng(0)
    for cls in ("benign", "malignant"):
        (root / cls).mkdir(parents=True)
        for k in range(1, n + 1):
            m = np.zeros((size, size), bool)
            cy, cx, ry, rx = rng.integers(15, 45, 2).tolist() + rng.integers(5, 14, 2).tolist()
            yy, xx = np.mgrid[:size, :size]
            m |= ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
            m[cy - 2:cy + 2, cx:cx + 25] = True                    # an asymmetric tail
            Image.fromarray(np.where(m, 220, 40).astype(np.uint8)).save(root / cls / f"{cls} ({k}).png")
            Image.fromarray(m.astype(np.uint8) * 255).save(root / cls / f"{cls} ({k})_mask.png")
    return root


def agreement(img: torch.Tensor, mask: torch.Tensor) -> float:
    """IoU between the mask and the image's bright (lesion) pixels."""
    seg, m = img > (220 + 40) / 2 / 255, mask.bool()
    return ((seg & m).sum() / (seg | m).sum()).item()


def test_augmentation_keeps_image_and_mask_aligned(tmp_path, monkeypatch):
    """Geometric ops (crop, flips) move image and mask together. Photometric ops are made
    no-ops here so the lesion stays the bright level set of the image; the next test covers
    them. A mask transformed differently (or not at all) gives IoU far below 0.9."""
    monkeypatch.setattr(data, "PHOTOMETRIC", (lambda im: im,))
    root = two_level_fixture(tmp_path / "two")
    train, _, _, _ = build_datasets(cfg(root, clip_norm=False, size=64))
    plain = data.UltrasoundDataset(train.items, train.cfg, train=False)
    random.seed(0)
    torch.manual_seed(0)
    moved, ious = 0, []
    for _ in range(10):
        for i in range(len(train)):
            x = train[i]
            img, m = x["image"][0], x["mask"]
            assert set(m.unique().tolist()) <= {0, 1}, "masks stay binary (nearest)"
            iou = agreement(img, m)
            # The mask as given must fit the image better than the same mask displaced.
            others = [torch.roll(m, 2, d) for d in (0, 1)] + [torch.roll(m, -2, d) for d in (0, 1)]
            others += [m.flip(0), m.flip(1)]
            assert iou > max(agreement(img, o) for o in others), "mask displaced from image"
            ious.append(iou)
            moved += agreement(plain[i]["image"][0], m) < 0.9
    assert np.mean(ious) > 0.97 and min(ious) > 0.8
    assert moved > 8, "augmentation ran and moved the masks"


def test_photometric_ops_change_the_image_only(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "GEOMETRIC", (lambda im, m, s: (im, m),))
    root = two_level_fixture(tmp_path / "two")
    train, _, _, _ = build_datasets(cfg(root, clip_norm=False, size=64))
    plain = data.UltrasoundDataset(train.items, train.cfg, train=False)
    random.seed(0)
    changed = 0
    for _ in range(5):
        for i in range(len(train)):
            x, ref = train[i], plain[i]
            assert torch.equal(x["mask"], ref["mask"])
            changed += not torch.equal(x["image"], ref["image"])
    assert changed > 10


def test_augment_follows_official_structure(monkeypatch):
    """p = 0.5 gate, then photometric ops on the image only, geometric ops on both."""
    im = Image.fromarray(np.tile(np.arange(64, dtype=np.uint8) * 3, (64, 1)))
    mask = Image.fromarray((np.arange(64)[None, :] > 40).repeat(64, 0).astype(np.uint8) * 255)
    random.seed(1)
    torch.manual_seed(1)
    outs = [data.augment(im, mask, 64) for _ in range(200)]
    untouched = sum(o[0] is im and o[1] is mask for o in outs)
    assert 70 < untouched < 130, "about half the draws are left alone"
    flipped = [o for o in outs if np.asarray(o[1])[0, 0] == 255]
    assert flipped, "horizontal flips move the mask"
    assert all(np.asarray(o[1]).shape == (64, 64) for o in outs)


# ----------------------------------------------------------------------------- splits
def test_split_stratified_seeded_and_complete(tmp_path):
    root = write_dataset(tmp_path / "p", PhantomConfig(size=48, n=60, seed=2, p_malignant=0.3))
    a = build_datasets(cfg(root, task="cls", seed=1, check_files=False))
    b = build_datasets(cfg(root, task="cls", seed=1, check_files=False))
    c = build_datasets(cfg(root, task="cls", seed=2, check_files=False))
    keys = lambda sets: [[it.key for it in s.items] for s in sets[:3]]
    assert keys(a) == keys(b) and keys(a) != keys(c)
    flat = sum(keys(a), [])
    assert len(flat) == len(set(flat)) == 60, "disjoint and complete"
    labels = [it.label for s in a[:3] for it in s.items]
    n1 = labels.count(1)
    for part in a[1:3]:  # val and test: 10 % of each class
        ys = [it.label for it in part.items]
        assert ys.count(1) == round(n1 * 0.1) and ys.count(0) == round((60 - n1) * 0.1)


def test_split_saved_atomically_and_reused(busi, tmp_path):
    path = tmp_path / "run" / "split.json"
    train, val, test, info = build_datasets(cfg(busi, split_path=str(path)))
    saved = json.loads(path.read_text())
    assert saved["test"] == [it.key for it in test.items] and info["split"] == "8:1:1 stratified"
    assert [p.name for p in path.parent.iterdir()] == ["split.json"], "no temp file left"
    # Edit the file: a rebuild must follow it, whatever the seed says.
    saved["test"].append(saved["train"].pop(0))
    path.write_text(json.dumps(saved))
    train2, _, test2, info2 = build_datasets(cfg(busi, split_path=str(path), seed=99))
    assert [it.key for it in test2.items] == saved["test"] and len(train2) == len(train) - 1
    assert info2["split"].startswith("reused")


# ----------------------------------------------------------------------------- bad input
def test_corrupt_image(busi, tmp_path):
    root = copy(busi, tmp_path)
    bad = root / "benign" / "benign (2).png"
    bad.write_bytes(bad.read_bytes()[:100])                  # truncated
    (root / "malignant" / "malignant (3).png").write_bytes(b"not an image at all")
    with pytest.raises(DataError, match=r"benign \(2\)\.png: cannot be read as an image.*--skip-bad"):
        build_datasets(cfg(root))
    with pytest.warns(UserWarning, match="skipped 2 bad"):
        sets = build_datasets(cfg(root, skip_bad=True))
    assert sets[3]["health"]["skipped_bad"] == 2 and sum(len(s) for s in sets[:3]) == 28


def test_mask_size_differs(busi, tmp_path):
    root = copy(busi, tmp_path)
    m = root / "malignant" / "malignant (1)_mask.png"
    Image.open(m).resize((100, 90)).save(m)
    with pytest.raises(DataError, match=r"malignant \(1\)_mask\.png: mask is 100x90.*128x128"):
        build_datasets(cfg(root))
    assert build_datasets(cfg(root, skip_bad=True))[3]["health"]["skipped_bad"] == 1
    assert build_datasets(cfg(root, task="cls"))[3]["health"]["skipped_bad"] == 0, "cls ignores masks"


def test_non_binary_mask_thresholded_with_counted_warning(busi, tmp_path):
    root = copy(busi, tmp_path)
    m = root / "benign" / "benign (1)_mask.png"
    v = np.asarray(Image.open(m)).copy()
    v[v > 0] = 128
    v[0, :5] = 7                                   # faint values: below half the maximum
    Image.fromarray(v).save(m)
    with pytest.warns(UserWarning, match=r"1 mask\(s\) are not binary.*benign \(1\)_mask.*0\.5 x"):
        sets = build_datasets(cfg(root, crop=False, size=128))
    assert sets[3]["health"]["masks_repaired"] == 1 and sets[3]["health"]["mask_threshold"] == 0.5
    x = next(s for ds in sets[:3] for s in (ds[i] for i in range(len(ds))) if s["path"].endswith("benign (1).png"))
    assert torch.equal(x["mask"], torch.from_numpy(v >= 64).long())


def test_image_without_mask_in_segmentation(busi, tmp_path):
    root = copy(busi, tmp_path)
    (root / "benign" / "benign (4)_mask.png").unlink()
    for m in (root / "benign").glob("benign (4)_mask_*.png"):
        m.unlink()
    with pytest.raises(DataError, match=r"benign \(4\)\.png: no mask"):
        build_datasets(cfg(root))
    assert build_datasets(cfg(root, skip_bad=True))[3]["health"]["skipped_bad"] == 1


def test_empty_folders(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    with pytest.raises(DataError, match=r"images: no images"):
        build_datasets(cfg(tmp_path, dataset="folder"))
    (tmp_path / "benign").mkdir()
    with pytest.raises(DataError, match=r"benign: no images"):
        build_datasets(cfg(tmp_path, dataset="busi", skip_bad=True))
    with pytest.raises(DataError, match="data folder not found"):
        build_datasets(cfg(tmp_path / "nope", dataset="busi"))


def test_unknown_label_in_labels_csv(busi, tmp_path):
    root = tmp_path / "f"
    recs = records(busi)[:21]
    write_flat(root, recs, busi)
    rows = [f"case{r['index']:03d}.png,{r['label']}" for r in recs]
    rows[3] = rows[3].split(",")[0] + ",suspicious"
    (root / "labels.csv").write_text("\n".join(rows))
    with pytest.raises(DataError, match=r"labels\.csv \(row 4: case003\.png,suspicious\): unknown"):
        build_datasets(cfg(root, dataset="folder", task="cls"))
    with pytest.warns(UserWarning, match="skipped"):
        sets = build_datasets(cfg(root, dataset="folder", task="cls", skip_bad=True))
    assert sum(len(s) for s in sets[:3]) == 20
    assert sets[3]["health"]["bad_label_rows"] == 1 and sets[3]["health"]["skipped_bad"] == 1


def test_split_file_naming_a_missing_image(busi, tmp_path):
    path = tmp_path / "split.json"
    build_datasets(cfg(busi, split_path=str(path)))
    saved = json.loads(path.read_text())
    saved["val"].append("benign/benign (999).png")
    path.write_text(json.dumps(saved))
    with pytest.raises(DataError, match=r"split\.json: the val split names 'benign/benign \(999\)\.png'"):
        build_datasets(cfg(busi, split_path=str(path)))
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        sets = build_datasets(cfg(busi, split_path=str(path), skip_bad=True))
    health = sets[3]["health"]
    assert health["missing_split_entries"] == 1 and health["skipped_bad"] == 0, "an entry, not an image"
    assert len(sets[1]) == len(saved["val"]) - 1


def test_unknown_dataset_and_task():
    with pytest.raises(DataError, match="unknown dataset 'bus'"):
        build_datasets(DataConfig(dataset="bus", root="."))
    with pytest.raises(DataError, match="unknown task"):
        build_datasets(DataConfig(dataset="busi", root=".", task="det"))
