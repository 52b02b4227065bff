"""Bad data never becomes a silent result (issue 17, data side; issue 16 items 10-11): masks mean
the same in every file format, duplicate stems, conflicting label rows and stale splits are
refused, every image dropped or repaired is counted in info["health"], tiny data is refused up
front, names match across BOM / NFD spellings, and the crop keeps dark tissue. Every test builds
its own tiny data."""
import json
import re
import unicodedata
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from scipy import ndimage
from torch.utils.data import default_collate

from clip_us import metrics
from clip_us.data import MIN_IMAGES, DataConfig, DataError, build_datasets, imaging_box, read_gray, read_mask
from clip_us.phantom import PhantomConfig, make_sample, write_dataset

HEALTH_KEYS = {"images_found", "images_used", "skipped_bad", "left_out_normal", "duplicates",
               "not_in_split", "masks_repaired", "mask_threshold", "mask_threshold_of",
               "empty_masks", "bad_label_rows", "duplicate_label_rows", "missing_split_entries"}


def ellipse(rng, size: int) -> np.ndarray:
    yy, xx = np.mgrid[:size, :size]
    cy, cx = rng.integers(size // 3, 2 * size // 3, 2)
    ry, rx = rng.integers(size // 8, size // 4, 2)
    return ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1


def save_mask(m: np.ndarray, path: Path, fmt: str) -> Path:
    """One boolean mask in the file formats users produce."""
    u8 = m.astype(np.uint8) * 255
    alpha = np.full_like(u8, 255)
    if fmt == "L":
        im = Image.fromarray(u8)
    elif fmt == "1":
        im = Image.fromarray(u8).convert("1")
    elif fmt == "RGB":
        im = Image.fromarray(np.stack([u8] * 3, -1))
    elif fmt == "RGBA":           # opaque: black background, white lesion (image editors)
        im = Image.fromarray(np.stack([u8] * 3 + [alpha], -1), "RGBA")
    elif fmt == "RGBA-alpha":     # white everywhere, the lesion in alpha (colour carries nothing)
        im = Image.fromarray(np.stack([np.full_like(u8, 255)] * 3 + [u8], -1), "RGBA")
    elif fmt == "LA":
        im = Image.fromarray(np.stack([u8, alpha], -1), "LA")
    elif fmt == "P":
        im = Image.fromarray(u8).convert("P")
    elif fmt == "P-red":          # palette indices 0 / 1 = black / red
        im = Image.fromarray(m.astype(np.uint8), "P")
        im.putpalette([0, 0, 0, 255, 0, 0])
    elif fmt == "I;16":
        im = Image.fromarray(m.astype(np.uint16) * 65535)
    elif fmt == "I;16-01":        # 16-bit label map 0 / 1
        im = Image.fromarray(m.astype(np.uint16))
    else:
        raise ValueError(fmt)
    im.save(path)
    return path


FORMATS = ("L", "1", "RGB", "RGBA", "RGBA-alpha", "LA", "P", "P-red", "I;16", "I;16-01")


def lesion_set(root: Path, n: int = 20, size: int = 48, fmt: str = "L", labels: bool = True,
               seed: int = 0) -> Path:
    """images/ + masks/ + labels.csv: grey speckle with a darker elliptic lesion."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for i in range(n):
        m = ellipse(rng, size)
        img = np.clip(np.where(m, 70, 150) + rng.normal(0, 20, m.shape), 1, 255).astype(np.uint8)
        Image.fromarray(img).save(root / "images" / f"case{i:02d}.png")
        save_mask(m, root / "masks" / f"case{i:02d}.png", fmt)
    if labels:
        (root / "labels.csv").write_text("image,label\n" + "".join(
            f"case{i:02d}.png,{('benign', 'malignant')[i % 2]}\n" for i in range(n)))
    return root


def cfg(root, **kw) -> DataConfig:
    kw.setdefault("dataset", "folder")
    kw.setdefault("size", 32)
    kw.setdefault("crop", False)
    return DataConfig(root=str(root), **kw)


def quiet_build(c: DataConfig):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return build_datasets(c)


# ----------------------------------------------------------------------------- mask formats
def test_mask_formats_read_identically(tmp_path):
    m = ellipse(np.random.default_rng(3), 40)
    ref = None
    for fmt in FORMATS:
        path = save_mask(m, tmp_path / f"{fmt}.png", fmt)
        union, binary = read_mask([path], m.shape, "img")
        assert binary, fmt
        assert np.array_equal(union, m), f"{fmt}: {union.mean():.2f} lesion vs {m.mean():.2f}"
        ref = union if ref is None else ref
        assert np.array_equal(union, ref)


def short_run_dice(root: Path) -> list[float]:
    """Train a 3x3 conv for a few full-batch steps on the train split, Dice per test image."""
    train, _, test, _ = quiet_build(cfg(root, task="seg", train_aug=False))
    torch.manual_seed(0)
    net = torch.nn.Conv2d(3, 2, 3, padding=1)
    opt = torch.optim.SGD(net.parameters(), lr=0.5)
    batch = default_collate([train[i] for i in range(len(train))])
    for _ in range(8):
        loss = F.cross_entropy(net(batch["image"]), batch["mask"])
        opt.zero_grad()
        loss.backward()
        opt.step()
    test_batch = default_collate([test[i] for i in range(len(test))])
    with torch.no_grad():
        pred = net(test_batch["image"]).argmax(1)
    return [metrics.dice(p.numpy(), g.numpy()) for p, g in zip(pred, test_batch["mask"])]


def test_mask_formats_give_identical_dice_in_a_short_run(tmp_path):
    dice = {fmt: short_run_dice(lesion_set(tmp_path / fmt.replace(";", ""), fmt=fmt))
            for fmt in ("L", "RGBA", "LA", "P", "I;16")}
    assert all(d == dice["L"] for d in dice.values()), dice
    assert 0 < np.mean(dice["L"]) < 1, "a real score, not the all-lesion 1.0"


# ----------------------------------------------------------------------------- soft masks
def test_soft_masks_thresholded_at_half_their_maximum(tmp_path):
    root = lesion_set(tmp_path / "soft", size=64)
    truth = {}
    for i, p in enumerate(sorted((root / "masks").iterdir())):
        m = np.asarray(Image.open(p)) > 0
        truth[p.stem] = m
        if i < 3:    # blurred edges, as an anti-aliased or resized mask has them
            Image.fromarray(ndimage.gaussian_filter(m * 255.0, 1.5).astype(np.uint8)).save(p)
    with pytest.warns(UserWarning, match=r"3 mask\(s\) are not binary.*0\.5 x each mask's maximum"):
        train, val, test, info = build_datasets(cfg(root, size=64))
    h = info["health"]
    assert h["masks_repaired"] == 3 and h["mask_threshold"] == 0.5
    for it in train.items + val.items + test.items:
        m, _ = read_mask(it.masks, (64, 64), it.image)
        t = truth[it.image.stem]
        assert abs(int(m.sum()) - int(t.sum())) <= 0.1 * t.sum(), "area kept within 10 %"
    blurred = next(p for p in sorted((root / "masks").iterdir()))
    anything = read_mask([blurred], (64, 64), "img", threshold=0)[0]
    assert anything.sum() > 1.5 * truth[blurred.stem].sum(), "the old '> 0' rule inflates it"


# ----------------------------------------------------------------------------- duplicates
def test_two_images_with_one_stem(tmp_path):
    root = lesion_set(tmp_path / "d")
    Image.open(root / "images" / "case03.png").convert("RGB").save(root / "images" / "case03.jpg")
    with pytest.raises(DataError, match=r"case03\.jpg and .*case03\.png share the stem"):
        build_datasets(cfg(root))
    with pytest.warns(UserWarning, match="2 duplicate"):
        sets = build_datasets(cfg(root, skip_bad=True))
    h = sets[3]["health"]
    assert h["duplicates"] == 2 and h["images_used"] == 19 and h["bad_label_rows"] == 0
    assert not any(it.image.stem == "case03" for s in sets[:3] for it in s.items)


def test_two_masks_for_one_image(tmp_path):
    root = lesion_set(tmp_path / "d")
    (root / "masks" / "case05_mask.png").write_bytes((root / "masks" / "case05.png").read_bytes())
    with pytest.raises(DataError, match=r"case05\.png: 2 masks match it"):
        build_datasets(cfg(root))
    assert quiet_build(cfg(root, task="cls"))[3]["health"]["skipped_bad"] == 0, "cls reads no mask"


def test_conflicting_and_duplicate_label_rows(tmp_path):
    root = lesion_set(tmp_path / "d")
    csv = root / "labels.csv"
    csv.write_text(csv.read_text() + "case04.png,malignant\n")      # row 2 says benign
    with pytest.raises(DataError, match=r"rows 6 \(case04\.png,benign\) and 22 \(case04\.png,"
                                        r"malignant\) give one image two labels"):
        build_datasets(cfg(root, task="cls"))
    csv.write_text(csv.read_text().replace("case04.png,malignant\n", "case04,malignant\n"))
    with pytest.raises(DataError, match="two labels"):                 # same image by its stem
        build_datasets(cfg(root, task="cls"))
    csv.write_text(csv.read_text().replace("case04,malignant\n", "case04.png,benign\n"))
    with pytest.warns(UserWarning, match="1 exact duplicate labels.csv row"):
        sets = build_datasets(cfg(root, task="cls"))
    assert sets[3]["health"]["duplicate_label_rows"] == 1 and sets[3]["health"]["images_used"] == 20


# ----------------------------------------------------------------------------- stale split
def test_split_json_reused_only_for_its_own_data(tmp_path):
    a, b = lesion_set(tmp_path / "a"), lesion_set(tmp_path / "b", n=24, seed=1)
    split = tmp_path / "run" / "split.json"
    quiet_build(cfg(a, split_path=str(split)))
    saved = json.loads(split.read_text())
    assert saved["root"] == str(a.resolve()) and len(saved["fingerprint"]) == 16
    assert quiet_build(cfg(a, split_path=str(split)))[3]["split"].startswith("reused")
    with pytest.raises(DataError, match=r"made for other data .* new --out-dir .* --split-file"):
        build_datasets(cfg(b, split_path=str(split)))
    # Same root, one image more: the item list changed, so the split is stale too.
    Image.open(a / "images" / "case00.png").save(a / "images" / "extra.png")
    Image.open(a / "masks" / "case00.png").save(a / "masks" / "extra.png")
    with pytest.raises(DataError, match="made for other data"):
        build_datasets(cfg(a, split_path=str(split)))
    # --split-file forces it: images it does not name are left out and counted.
    with pytest.warns(UserWarning, match="1 image.* in no part of the split"):
        sets = build_datasets(cfg(a, split_file=str(split), split_path=str(tmp_path / "r2" / "s.json")))
    assert sets[3]["health"]["not_in_split"] == 1 and sets[3]["split"] == f"from {split}"
    assert json.loads((tmp_path / "r2" / "s.json").read_text())["test"] == saved["test"]


def test_split_json_without_fingerprint_or_with_a_leak(tmp_path):
    a = lesion_set(tmp_path / "a")
    split = tmp_path / "split.json"
    quiet_build(cfg(a, split_path=str(split)))
    saved = json.loads(split.read_text())
    legacy = {k: saved[k] for k in ("train", "val", "test")}
    split.write_text(json.dumps(legacy))
    with pytest.raises(DataError, match="not recorded"):
        build_datasets(cfg(a, split_path=str(split)))
    legacy["test"].append(legacy["train"][0])
    split.write_text(json.dumps(legacy))
    with pytest.raises(DataError, match=r"in both the train and the test split"):
        build_datasets(cfg(a, split_file=str(split)))


# ----------------------------------------------------------------------------- counting drops
def test_every_image_found_is_used_or_counted(tmp_path):
    root = write_dataset(tmp_path / "busi", PhantomConfig(size=48, n=30, seed=4, p_normal=0.3))
    n_normal = len([p for p in (root / "normal").iterdir() if "_mask" not in p.name])
    bad = next((root / "benign").glob("* (2).png"))
    bad.write_bytes(b"not a png")
    with pytest.warns(UserWarning) as rec:
        sets = build_datasets(DataConfig(dataset="busi", root=str(root), size=32, skip_bad=True))
    h = sets[3]["health"]
    assert set(h) == HEALTH_KEYS and json.loads(json.dumps(h)) == h
    assert h["left_out_normal"] == n_normal > 0 and h["skipped_bad"] == 1
    assert h["images_found"] == 30 == (h["images_used"] + h["skipped_bad"] + h["left_out_normal"]
                                       + h["duplicates"] + h["not_in_split"])
    text = " | ".join(str(w.message) for w in rec)
    assert f"left out {n_normal} normal image(s)" in text and "skipped 1 bad image(s)" in text


def test_labels_csv_with_other_columns_names_them(tmp_path):
    root = lesion_set(tmp_path / "d")
    csv = root / "labels.csv"
    csv.write_text(csv.read_text().replace("image,label\n", "file,class\n"))
    for skip_bad in (False, True):          # a header is no bad row that --skip-bad could skip
        with pytest.raises(DataError, match=rf"^{re.escape(str(csv))}: columns file, class found, "
                                            rf"expected image,label"):
            build_datasets(cfg(root, task="cls", skip_bad=skip_bad))
    # no header, and the first row's label mistyped: that row is bad, the columns are fine
    csv.write_text(csv.read_text().replace("file,class\n", "").replace("00.png,benign", "00.png,benin"))
    with pytest.raises(DataError, match=r"\(row 1: case00\.png,benin\): unknown .*, or pass --skip-bad "):
        build_datasets(cfg(root, task="cls"))


def test_command_line_messages_name_the_flag(tmp_path, run_script):
    args = ["--arch", "tiny", "--weights", "none", "--image-size", "64", "--phantom-n", "24",
            "--phantom-size", "128", "--workers", "0", "--out-dir", tmp_path / "run"]
    with pytest.raises(DataError, match=r"^--mask-threshold 1\.5 is not a fraction"):
        run_script("train_seg.py", args + ["--mask-threshold", "1.5"])


def test_normal_rows_of_labels_csv_are_counted(tmp_path):
    root = lesion_set(tmp_path / "d", n=24)
    rows = (root / "labels.csv").read_text().splitlines()
    rows[1:4] = [r.split(",")[0] + ",normal" for r in rows[1:4]]
    (root / "labels.csv").write_text("\n".join(rows) + "\n")
    with pytest.warns(UserWarning, match="left out 3 normal"):
        sets = build_datasets(cfg(root, task="cls"))
    assert sets[3]["health"]["left_out_normal"] == 3 and sets[3]["health"]["images_used"] == 21
    h = quiet_build(cfg(root, task="cls", keep_normal=True))[3]["health"]
    assert h["left_out_normal"] == 0 and h["images_used"] == 24


def test_skip_bad_counts_images_and_says_once_that_masks_are_missing(tmp_path):
    root = lesion_set(tmp_path / "d")
    for p in (root / "masks").iterdir():
        p.unlink()
    (root / "masks").rmdir()
    with pytest.raises(DataError, match=r"masks: masks folder not found.*\(20 images\)") as e:
        build_datasets(cfg(root, skip_bad=True))
    assert "20 skipped as bad" in str(e.value)
    assert str(e.value).count("masks folder not found") == 1


def test_skip_bad_names_the_real_fault(tmp_path):
    """A labelled image without a mask is 'no mask', not 'not among the images', and counts once."""
    root = lesion_set(tmp_path / "d", n=21)
    (root / "masks" / "case07.png").unlink()
    with pytest.raises(DataError, match="no mask") as e:
        build_datasets(cfg(root))
    assert str(e.value).count("images/case07.png") == 1, "the file is named once"
    with pytest.warns(UserWarning, match=r"skipped 1 bad image\(s\).*case07\.png: no mask"):
        sets = build_datasets(cfg(root, skip_bad=True))
    h = sets[3]["health"]
    assert h["skipped_bad"] == 1 and h["bad_label_rows"] == 0 and h["images_used"] == 20


# ----------------------------------------------------------------------------- empty and tiny
def test_empty_masks_counted_and_all_empty_refused(tmp_path):
    root = lesion_set(tmp_path / "d")
    masks = sorted((root / "masks").iterdir())
    for p in masks[:2]:
        Image.fromarray(np.zeros((48, 48), np.uint8)).save(p)
    with pytest.warns(UserWarning, match=r"2 image\(s\) have an empty mask"):
        sets = build_datasets(cfg(root))
    assert sets[3]["health"]["empty_masks"] == 2
    assert quiet_build(cfg(root, task="cls"))[3]["health"]["empty_masks"] is None, "cls reads no mask"
    for p in masks:
        Image.fromarray(np.zeros((48, 48), np.uint8)).save(p)
    with pytest.raises(DataError, match="every mask is empty"):
        build_datasets(cfg(root))


@pytest.mark.parametrize("side", [1, 8])
def test_image_smaller_than_a_patch(tmp_path, side):
    root = lesion_set(tmp_path / "d", n=21)
    Image.fromarray(np.full((side, side), 99, np.uint8)).save(root / "images" / "case02.png")
    Image.fromarray(np.full((side, side), 255, np.uint8)).save(root / "masks" / "case02.png")
    with pytest.raises(DataError, match=rf"case02\.png: image is {side}x{side} pixels, smaller than "
                                        r"one 16-pixel patch"):
        build_datasets(cfg(root))
    assert quiet_build(cfg(root, skip_bad=True))[3]["health"]["skipped_bad"] == 1


def test_tiny_data_refused_up_front(tmp_path, monkeypatch):
    monkeypatch.setenv("CLIP_US_CACHE", str(tmp_path / "cache"))
    with pytest.raises(DataError, match=rf"--phantom-n 3 is too few .* at least {MIN_IMAGES}"):
        build_datasets(DataConfig(dataset="phantom", phantom_n=3, phantom_size=32, size=32))
    assert not (tmp_path / "cache").exists(), "refused before generating anything"
    root = lesion_set(tmp_path / "small", n=6)
    split = tmp_path / "run" / "split.json"
    with pytest.raises(DataError, match=rf"set would be empty: 6 usable images .* at least {MIN_IMAGES}"):
        build_datasets(cfg(root, split_path=str(split)))
    assert not split.parent.exists(), "a refused data set writes no split.json"
    sets = quiet_build(cfg(root, require_split=False))      # evaluation on every image
    assert sum(len(s) for s in sets[:3]) == 6
    with pytest.raises(DataError, match="image size 0"):
        build_datasets(cfg(root, size=0))


# ----------------------------------------------------------------------------- names
def test_bom_and_nfd_names_match(tmp_path):
    root = lesion_set(tmp_path / "d", n=20)
    nfc_name, nfd_name = "café.png", unicodedata.normalize("NFD", "café.png")
    assert nfc_name != nfd_name
    (root / "images" / "case00.png").rename(root / "images" / nfd_name)      # stored as NFD
    (root / "masks" / "case00.png").rename(root / "masks" / nfd_name)
    text = (root / "labels.csv").read_text().replace("case00.png", nfc_name)  # typed as NFC
    (root / "labels.csv").write_bytes(b"\xef\xbb\xbf" + text.encode("utf-8"))  # Excel's BOM
    sets = build_datasets(cfg(root, task="cls"))
    h = sets[3]["health"]
    assert h["images_used"] == 20 and h["bad_label_rows"] == 0 and h["skipped_bad"] == 0
    cafe = next(it for s in sets[:3] for it in s.items if "caf" in it.key)
    assert cafe.label == 0 and cafe.key == f"images/{nfc_name}"


def test_root_that_is_a_file(tmp_path):
    f = tmp_path / "data.zip"
    f.write_bytes(b"PK")
    with pytest.raises(DataError, match=r"data\.zip: is a file, not a folder"):
        build_datasets(cfg(f))
    with pytest.raises(DataError, match="data folder not found"):
        build_datasets(cfg(tmp_path / "nope"))


# ----------------------------------------------------------------------------- crop
def speckle(rng, shape, level) -> np.ndarray:
    """Fully developed speckle: |PSF-blurred complex Gaussian|, mean `level`."""
    z = rng.standard_normal((2,) + shape)
    env = np.hypot(ndimage.gaussian_filter(z[0], (0.9, 1.8)), ndimage.gaussian_filter(z[1], (0.9, 1.8)))
    return env / env.mean() * level


def screenshot(kind: str, dark: float, seed: int, S: int = 256):
    """A scanner screenshot: a rectangular image (rows 30-230, columns 40-216) of speckle at
    level 90 with one dark speckled structure (mean `dark` grey levels), on black with text, a
    depth ruler 4 px from the image and tick marks."""
    rng = np.random.default_rng(seed)
    t, b, l, r = 30, 230, 40, 216
    yy, xx = np.mgrid[:S, :S]
    level = np.full((S, S), 90.0)
    if kind == "cyst":       # a large anechoic cyst across the image
        level[((yy - 150) / 40) ** 2 + ((xx - 128) / 95) ** 2 <= 1] = dark
    elif kind == "shadow":   # posterior shadowing widening to the bottom edge
        level[(yy > 120) & (np.abs(xx - 128) <= 30 + (yy - 120) * 1.2)] = dark
    elif kind == "band":     # a dark layer between two bright ones
        level[110:140] = dark
    fov = (yy >= t) & (yy < b) & (xx >= l) & (xx < r)
    img = np.where(fov, np.clip(speckle(rng, (S, S), 1) * level, 0, 255), 0).astype(np.uint8)
    pil = Image.fromarray(img)
    draw = ImageDraw.Draw(pil)
    draw.text((3, 3), "BREAST L12-5 10MHz", fill=255)
    draw.text((150, 240), "D 4.0cm", fill=200)
    draw.line((r + 4, t, r + 4, b), fill=230)
    for k in range(6):
        draw.line((r + 4, t + 40 * k, r + 8, t + 40 * k), fill=230)
    return np.asarray(pil), (t, b, l, r)


@pytest.mark.parametrize("kind", ["cyst", "shadow", "band"])
@pytest.mark.parametrize("dark", [3.0, 6.0])
def test_crop_keeps_dark_tissue(kind, dark):
    img, (t, b, l, r) = screenshot(kind, dark, seed=1)
    assert (img[t:b, l:r] <= 10).mean() > 0.08, "the fixture has a large dark structure"
    box = imaging_box(img)
    assert max(abs(x - y) for x, y in zip(box, (t, b, l, r))) <= 1, (kind, box)


def test_crop_of_phantom_overlays_unchanged():
    """The phantom's screenshots (text, grey bar, ruler, body marker, calipers) are cropped to
    their field of view, as before, for both probe shapes and every organ."""
    pcfg = PhantomConfig(size=256, seed=5)
    for i in range(16):
        s = make_sample(i, pcfg)
        ys, xs = np.nonzero(s["fov"])
        fov = (ys.min(), ys.max() + 1, xs.min(), xs.max() + 1)
        box = imaging_box(s["image"])
        assert max(abs(x - y) for x, y in zip(box, fov)) <= 3, (i, box, fov)


def test_nextgen_is_not_cropped_again_by_default(tmp_path):
    root = tmp_path / "ng"
    src = lesion_set(tmp_path / "src", n=20, size=64, labels=False)
    (root / "all").mkdir(parents=True)
    (src / "images").rename(root / "all" / "images")
    (src / "masks").rename(root / "all" / "masks")
    img = np.asarray(Image.open(root / "all" / "images" / "case00.png")).copy()
    img[:, :20] = 0                                   # a black margin the crop would remove
    Image.fromarray(img).save(root / "all" / "images" / "case00.png")
    names = [f"case{i:02d}.png" for i in range(20)]
    (root / "segmentation" / "BUSI").mkdir(parents=True)
    for part, cut in (("train", names[:16]), ("val", names[16:18]), ("test", names[18:])):
        (root / "segmentation" / "BUSI" / f"{part}.txt").write_text("\n".join(cut) + "\n")
    c = DataConfig(dataset="nextgen", root=str(root), size=64, clip_norm=False, train_aug=False)
    train, _, _, info = build_datasets(c)
    assert info["crop"] is False and train.cfg.crop is False
    x = train[0]["image"][0]
    gray = Image.fromarray(read_gray(train.items[0].image))
    full = np.asarray(gray.resize((64, 64), Image.Resampling.BICUBIC))
    assert torch.allclose(x, torch.from_numpy(full / 255.0).float(), atol=1e-6), "bicubic, uncropped"
    train, _, _, info = build_datasets(DataConfig(**{**vars(c), "crop": True}))
    assert info["crop"] is True and not torch.equal(train[0]["image"][0], x), "crop=True crops"
