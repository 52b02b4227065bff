"""Ultrasound data sets: folder layouts, seeded splits, preprocessing and augmentation.

Seed 003 §4.2: non-imaging regions with overlay annotations are cropped away, images are resized
to 224 x 224, the data are split 8:1:1 (TN3K and Prostate: their test set is kept and the rest
split 8:2). The augmentation is the official code's (jinggqu/NextGen-UIA, `dataset_seg.py`):
with p = 0.5, a random number of photometric operations, then a random number of geometric ones
(random resized crop with scale (0.8, 1.2) and ratio 1, horizontal flip, vertical flip,
identity), the geometric ones applied identically to image and mask (masks use nearest
interpolation; the official code used bilinear).

Layouts (`DataConfig.dataset`):
- busi:      {benign,malignant[,normal]}/<class> (N).png, masks <class> (N)_mask.png, _mask_1.png, ...
- nextgen:   all/images, all/masks, segmentation/<DS>/{train,val,test}.txt,
             classification/<DS>/labels.csv and split files (the NextGen-UIA release)
- prostate:  the nextgen layout with <DS> = prostate (2-D PNG slices)
- tn3k:      trainval-image/, trainval-mask/, test-image/, test-mask/
- ddti, folder: images/ and masks/ matched by file stem, optional labels.csv (image,label)
- phantom:   clip_us.phantom written once into a cache folder, then read as busi

Labels: benign 0, malignant 1 (the positive class); normal 2 only with keep_normal. Images the
layout gives no label get -1 (segmentation-only data sets).

    train, val, test, info = build_datasets(DataConfig(dataset="busi", root="data/BUSI", task="seg"))
    sample = train[0]  # dict(image=[3,S,S] float, mask=[S,S] long (seg), label=int, path=str)
"""
from __future__ import annotations

import csv
import json
import os
import random
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torchvision.transforms as T
import torchvision.transforms.functional as TF
from PIL import Image, ImageEnhance, ImageFilter, ImageOps
from scipy import ndimage
from torch.utils.data import Dataset

from .fileio import write_json

CLASSES = ("benign", "malignant", "normal")
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
LAYOUTS = ("busi", "nextgen", "prostate", "tn3k", "ddti", "folder", "phantom")


class DataError(ValueError):
    """A data set file is missing, unreadable or inconsistent; the message names the file."""


@dataclass
class DataConfig:
    dataset: str = "phantom"          # one of LAYOUTS
    root: str | None = None           # data set folder; phantom: None = the cache folder
    task: str = "seg"                 # "seg" (needs masks) or "cls" (needs labels)
    size: int = 224                   # output side in pixels
    seed: int = 0                     # the split's seed (augmentation uses torch/python RNGs)
    clip_norm: bool = True            # CLIP mean/std; False = [0, 1] pixels as the official code
    keep_normal: bool = False         # BUSI normal images as class 2
    skip_bad: bool = False            # skip bad files (counted in info) instead of raising
    split_path: str | None = None     # split JSON: reused when present, written when not
    nextgen_name: str | None = None   # <DS> of the nextgen layout (default: the only one)
    train_aug: bool = True            # augment the training set
    crop: bool = True                 # crop the imaging region (drop overlays, black borders)
    mask_threshold: int = 0           # mask pixel > this is foreground
    check_files: bool = True          # decode every file once when building (finds bad files)
    phantom_n: int = 200              # phantom: number of images
    phantom_size: int = 256           # phantom: side of the generated images
    phantom_seed: int = 0             # phantom: generator seed (independent of the split seed)
    phantom_organs: tuple = ("breast",)   # phantom: BUSI stand-in by default


@dataclass(frozen=True)
class Item:
    key: str                  # path relative to the data set root, as split files store it
    image: Path
    masks: tuple = ()         # mask files; their union is the lesion mask
    label: int = -1


class _Bad:
    """Collects bad files when skipping, raises at the first one otherwise."""

    def __init__(self, skip: bool):
        self.skip, self.messages = skip, []

    def __call__(self, where, what: str) -> None:
        self.add(f"{where}: {what}")

    def add(self, msg: str) -> None:
        if not self.skip:
            raise DataError(msg + ". Fix or remove the file, or pass skip_bad=True (--skip-bad) "
                                  "to skip bad files.")
        self.messages.append(msg)


# ----------------------------------------------------------------------------- decoding
def read_gray(path) -> np.ndarray:
    """Any PNG/JPEG/BMP/TIFF as uint8 grayscale [H, W]: RGB(A) and palette images go through
    luminance, alpha is dropped; 16-bit images are scaled by their bit depth."""
    try:
        with Image.open(path) as im:
            im.load()
            if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
                a = np.asarray(im, dtype=np.float32)
                # 10-, 12- and 16-bit data all come as 16-bit PNGs: scale by the smallest bit
                # depth that holds the peak, so images of one scanner keep their relative levels.
                bits = max(8, int(np.ceil(np.log2(float(a.max()) + 1))))
                return np.round(a * (255.0 / (2 ** bits - 1))).clip(0, 255).astype(np.uint8)
            return np.asarray(im.convert("L"))
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise DataError(f"{path}: cannot be read as an image ({type(e).__name__}: {e}); the file "
                        f"is corrupt, truncated or not an image") from e


def read_mask_values(path) -> np.ndarray:
    """A mask file's raw values [H, W]: palette masks give their indices, colour masks the
    largest channel, so a red-on-black mask counts as foreground."""
    try:
        with Image.open(path) as im:
            im.load()
            a = np.asarray(im)
    except (OSError, SyntaxError, ValueError) as e:
        raise DataError(f"{path}: cannot be read as a mask ({type(e).__name__}: {e})") from e
    return a.max(-1) if a.ndim == 3 else a


def is_binary(values: np.ndarray) -> bool:
    """0 plus at most one foreground value (0/1, 0/255 and bool masks are binary)."""
    fg = values[values > 0]
    return fg.size == 0 or fg.min() == fg.max()


def read_mask(masks, shape, image_path, threshold: int = 0) -> tuple[np.ndarray, bool]:
    """Union of the mask files as bool [H, W], and whether every file was binary."""
    union, binary = np.zeros(shape, bool), True
    for m in masks:
        v = read_mask_values(m)
        if v.shape != tuple(shape):
            raise DataError(f"{m}: mask is {v.shape[1]}x{v.shape[0]} (WxH) but its image "
                            f"{image_path} is {shape[1]}x{shape[0]}; masks must match their image")
        binary &= is_binary(v)
        union |= v > threshold
    return union, binary


# ----------------------------------------------------------------------------- layouts
def list_images(folder: Path) -> list[Path]:
    """Image files directly in `folder`, sorted; an empty or missing folder is an error."""
    if not folder.is_dir():
        raise DataError(f"{folder}: folder not found; check --data-root and --dataset")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTS)
    if not files:
        raise DataError(f"{folder}: no images ({', '.join(IMAGE_EXTS)}) in this folder; "
                        f"check --data-root and --dataset")
    return files


def parse_label(value: str) -> int | None:
    """'benign' / 'malignant' / 'normal' (any case) or 0 / 1 / 2; None if neither."""
    v = value.strip().lower()
    if v in CLASSES:
        return CLASSES.index(v)
    return int(v) if v.isdigit() and int(v) < len(CLASSES) else None


def read_labels_csv(path: Path, bad: _Bad) -> dict[str, int]:
    """labels.csv (image,label; header optional) as {image name as written: label}."""
    out = {}
    with open(path, newline="") as f:
        rows = [r for r in csv.reader(f) if r and any(c.strip() for c in r)]
    if rows and [c.strip().lower() for c in rows[0][:2]] == ["image", "label"]:
        rows = rows[1:]
    for n, row in enumerate(rows, start=1):
        label = parse_label(row[1]) if len(row) >= 2 else None
        if label is None:
            bad(f"{path} (row {n}: {','.join(row)})", "unknown or missing label; use benign, "
                "malignant or normal, or 0, 1, 2")
            continue
        out[row[0].strip()] = label
    return out


def attach_labels(pairs, labels: dict, where: Path, bad: _Bad) -> list[tuple]:
    """Give each (image, masks) its label from labels.csv, matched by file name or stem;
    a labels.csv row naming no image is a bad row."""
    by_name = {p.name: i for i, (p, _) in enumerate(pairs)}
    by_name.update({p.stem: i for i, (p, _) in enumerate(pairs)})
    found = [-1] * len(pairs)
    for name, label in labels.items():
        i = by_name.get(Path(name).name, by_name.get(Path(name).stem))
        if i is None:
            bad(where, f"labels.csv names {name!r}, which is not among the images")
            continue
        found[i] = label
    return [(p, m, y) for (p, m), y in zip(pairs, found)]


def pair_by_stem(img_dir: Path, mask_dir: Path | None, task: str, bad: _Bad) -> list[tuple]:
    """[(image, (mask,))] matching masks by stem (a `_mask` suffix is allowed)."""
    masks = {}
    if mask_dir is not None and mask_dir.is_dir():
        for m in sorted(mask_dir.iterdir()):
            if m.suffix.lower() in IMAGE_EXTS:
                masks[re.sub(r"_mask$", "", m.stem)] = m
    out = []
    for p in list_images(img_dir):
        if p.stem not in masks and task == "seg":
            bad(p, f"no mask for this image in {mask_dir} (expected {p.stem}.png or similar); "
                   f"segmentation needs one")
            continue
        out.append((p, (masks[p.stem],) if p.stem in masks else ()))
    return out


BUSI_MASK = re.compile(r"^(?P<stem>.+)_mask(_\d+)?$")


def scan_busi(root: Path, cfg: DataConfig, bad: _Bad):
    """BUSI as downloaded; the union of `_mask`, `_mask_1`, ... is the lesion."""
    classes = ["benign", "malignant"] + (["normal"] if cfg.keep_normal else [])
    if not any((root / c).is_dir() for c in classes):
        raise DataError(f"{root}: not a BUSI folder (expected benign/ and malignant/ inside)")
    items = []
    for label, cls in enumerate(classes):
        if not (root / cls).is_dir():
            continue
        files = list_images(root / cls)
        masks: dict[str, list] = {}
        for f in files:
            m = BUSI_MASK.match(f.stem)
            if m:
                masks.setdefault(m["stem"], []).append(f)
        for f in files:
            if BUSI_MASK.match(f.stem):
                continue
            if cfg.task == "seg" and f.stem not in masks:
                bad(f, "no mask file (expected '<name>_mask.png' beside it); segmentation needs one")
                continue
            items.append(Item(f.relative_to(root).as_posix(), f, tuple(masks.get(f.stem, ())), label))
    return items, None


def _read_split_txt(folder: Path) -> dict[str, list[str]]:
    return {s: [ln.strip() for ln in (folder / f"{s}.txt").read_text().splitlines() if ln.strip()]
            for s in ("train", "val", "test") if (folder / f"{s}.txt").is_file()}


def _nextgen_name(root: Path, cfg: DataConfig) -> str:
    want = cfg.nextgen_name or ("prostate" if cfg.dataset == "prostate" else None)
    kind = "segmentation" if cfg.task == "seg" else "classification"
    names = sorted(p.name for p in (root / kind).iterdir() if p.is_dir()) if (root / kind).is_dir() else []
    match = [n for n in names if want is None or n.lower() == want.lower()]
    if len(match) != 1:
        raise DataError(f"{root / kind}: cannot pick the data set (asked {want!r}, found {names}); "
                        f"pass nextgen_name (--nextgen-name)")
    return match[0]


def scan_nextgen(root: Path, cfg: DataConfig, bad: _Bad):
    """The NextGen-UIA release: images and masks share a file name under all/."""
    name = _nextgen_name(root, cfg)
    kind_dir = root / ("segmentation" if cfg.task == "seg" else "classification") / name
    split = _read_split_txt(kind_dir)
    labels_csv = root / "classification" / name / "labels.csv"
    labels = read_labels_csv(labels_csv, bad) if labels_csv.is_file() else {}
    if not split and cfg.task == "cls" and labels:
        split = {"all": list(labels)}
    if not split:
        raise DataError(f"{kind_dir}: no train.txt/val.txt/test.txt (or labels.csv) found")
    images, masks = root / "all" / "images", root / "all" / "masks"
    list_images(images)                     # an empty release is an error
    items, keys = [], {}
    for part, names in split.items():
        for n in names:
            img, mask = images / n, masks / n
            if not img.is_file():
                bad(kind_dir / f"{part}.txt", f"names {n!r}, which is missing from {images}")
            elif cfg.task == "seg" and not mask.is_file():
                bad(img, f"no mask {mask}; segmentation needs one")
            elif n not in keys:
                label = labels.get(n, -1)
                if cfg.task == "cls" and label == -1:
                    bad(img, f"no label in {labels_csv}")
                    continue
                if label == 2 and not cfg.keep_normal:
                    continue
                keys[n] = f"all/images/{n}"
                items.append(Item(keys[n], img, (mask,) if mask.is_file() else (), label))
    predefined = {p: [keys[n] for n in ns if n in keys] for p, ns in split.items() if p != "all"}
    return items, predefined or None


def _labelled_pairs(root: Path, pairs, cfg: DataConfig, bad: _Bad):
    """Items from (image, masks) pairs, labelled from root/labels.csv when it exists."""
    csv_path = root / "labels.csv"
    labels = read_labels_csv(csv_path, bad) if csv_path.is_file() else {}
    if cfg.task == "cls" and not labels:
        raise DataError(f"{root}: no labels.csv (columns image,label), so no classes to "
                        f"classify; use task 'seg' or add labels.csv")
    items = []
    for img, masks, label in attach_labels(pairs, labels, csv_path, bad):
        if cfg.task == "cls" and label == -1:
            bad(img, f"no label in {csv_path}")
        elif label != 2 or cfg.keep_normal:
            items.append(Item(img.relative_to(root).as_posix(), img, masks, label))
    return items


def scan_tn3k(root: Path, cfg: DataConfig, bad: _Bad):
    """TN3K: the predefined test set is kept; trainval is split 8:2 later."""
    trainval = pair_by_stem(root / "trainval-image", root / "trainval-mask", cfg.task, bad)
    test = pair_by_stem(root / "test-image", root / "test-mask", cfg.task, bad)
    items = _labelled_pairs(root, trainval + test, cfg, bad)
    test_keys = {p.relative_to(root).as_posix() for p, _ in test}
    return items, {"test": [it.key for it in items if it.key in test_keys]}


def _sub(root: Path, *names) -> Path:
    """The first of `names` that exists under root (images/ or image/, ...)."""
    return next((root / n for n in names if (root / n).is_dir()), root / names[0])


def scan_folder(root: Path, cfg: DataConfig, bad: _Bad):
    """DDTI and any plain layout: images/ + masks/ by stem, optional labels.csv."""
    pairs = pair_by_stem(_sub(root, "images", "image"), _sub(root, "masks", "mask"), cfg.task, bad)
    return _labelled_pairs(root, pairs, cfg, bad), None


def phantom_root(cfg: DataConfig) -> Path:
    """The phantom's folder: cfg.root, or a cache folder named by its settings
    ($CLIP_US_CACHE, default ~/.cache/clip_us, then phantom/...)."""
    if cfg.root:
        return Path(cfg.root)
    cache = Path(os.environ.get("CLIP_US_CACHE", Path.home() / ".cache" / "clip_us"))
    organs = "+".join(o.replace(" ", "_") for o in cfg.phantom_organs)
    normal = "-normal" if cfg.keep_normal else ""
    return cache / "phantom" / f"n{cfg.phantom_n}-s{cfg.phantom_size}-seed{cfg.phantom_seed}-{organs}{normal}"


def scan_phantom(root: Path, cfg: DataConfig, bad: _Bad):
    """Write the phantom (BUSI layout) if the folder has none yet, then read it as BUSI."""
    from clip_us import phantom   # only this option needs the generator
    if not (root / "metadata.jsonl").is_file():
        pcfg = phantom.PhantomConfig(size=cfg.phantom_size, n=cfg.phantom_n, seed=cfg.phantom_seed,
                                     organs=tuple(cfg.phantom_organs),
                                     p_normal=0.17 if cfg.keep_normal else 0.0)
        phantom.write_dataset(root, pcfg)
    return scan_busi(root, cfg, bad)


SCANNERS = {"busi": scan_busi, "nextgen": scan_nextgen, "prostate": scan_nextgen,
            "tn3k": scan_tn3k, "ddti": scan_folder, "folder": scan_folder, "phantom": scan_phantom}


# ----------------------------------------------------------------------------- checking
def check_items(items: list[Item], cfg: DataConfig, bad: _Bad) -> tuple[list[Item], int, str]:
    """Decode every image (and mask, for seg) once: drop or raise on bad ones; count and name
    an example of the non-binary masks (they are thresholded, with a warning)."""
    good, nonbinary, example = [], 0, ""
    for it in items:
        try:
            gray = read_gray(it.image)
            if cfg.task == "seg":
                _, binary = read_mask(it.masks, gray.shape, it.image, cfg.mask_threshold)
                nonbinary += not binary
                example = example or ("" if binary else str(it.masks[0]))
        except DataError as e:
            bad.add(str(e))
            continue
        good.append(it)
    return good, nonbinary, example


# ----------------------------------------------------------------------------- splits
def stratified_split(labels, fractions, seed: int) -> list[list[int]]:
    """Positions split by `fractions` (e.g. 0.8, 0.1, 0.1) within each label, seeded. The
    later parts get round(n * f) of each class, the first part the rest."""
    rng = np.random.default_rng(seed)
    parts = [[] for _ in fractions]
    labels = np.asarray(labels)
    for y in np.unique(labels):
        idx = rng.permutation(np.nonzero(labels == y)[0])
        sizes = [int(round(len(idx) * f)) for f in fractions[1:]]
        bounds = np.cumsum([len(idx) - sum(sizes)] + sizes)[:-1]
        for part, chunk in zip(parts, np.split(idx, bounds)):
            part += chunk.tolist()
    return [sorted(p) for p in parts]


def make_split(items: list[Item], predefined, seed: int) -> tuple[dict, str]:
    """{"train", "val", "test": [keys]} and how it was made."""
    if predefined and {"train", "val", "test"} <= predefined.keys():
        return {k: list(predefined[k]) for k in ("train", "val", "test")}, "predefined train/val/test"
    labels = [it.label for it in items]
    if predefined and "test" in predefined:  # TN3K / Prostate: keep test, split the rest 8:2
        test = set(predefined["test"])
        rest = [i for i, it in enumerate(items) if it.key not in test]
        tr, va = stratified_split([labels[i] for i in rest], (0.8, 0.2), seed)
        return {"train": [items[rest[i]].key for i in tr], "val": [items[rest[i]].key for i in va],
                "test": [it.key for it in items if it.key in test]}, "predefined test, rest 8:2 stratified"
    parts = stratified_split(labels, (0.8, 0.1, 0.1), seed)
    return {k: [items[i].key for i in p] for k, p in zip(("train", "val", "test"), parts)}, \
        "8:1:1 stratified"


def load_split(path: Path, root: Path, items: list[Item], bad: _Bad) -> dict:
    """A saved split; entries naming missing files are bad, entries whose files exist but were
    skipped or filtered out (e.g. normal images) are dropped."""
    try:
        saved = json.loads(path.read_text())
        parts = {k: saved[k] for k in ("train", "val", "test")}
    except (ValueError, KeyError) as e:
        raise DataError(f"{path}: not a split file ({e}); delete it to make a new split") from e
    known = {it.key for it in items}
    for name, keys in parts.items():
        for k in keys:
            if k not in known and not (root / k).is_file():
                bad(path, f"the {name} split names {k!r}, which is missing from {root}")
        parts[name] = [k for k in keys if k in known]
    return parts


# ----------------------------------------------------------------------------- preprocessing
def imaging_box(gray: np.ndarray, threshold: int = 10) -> tuple[int, int, int, int]:
    """(top, bottom, left, right) of the imaging region: the largest connected bright region
    after an opening that erases thin strokes (text, ruler ticks, caliper lines), so overlays
    and black borders fall outside. The whole image when nothing large is found."""
    H, W = gray.shape
    step = max(1, max(H, W) // 256)            # the box needs no more than ~256 px resolution
    fg = gray[::step, ::step] > threshold
    # Opening with a 5 x 5 square, as separable min/max filters (several times faster).
    fg = ndimage.maximum_filter(ndimage.minimum_filter(fg, size=5), size=5)
    lab, n = ndimage.label(fg)
    if n == 0:
        return 0, H, 0, W
    sizes = np.bincount(lab.ravel())[1:]
    if sizes.max() < 0.05 * fg.size:           # no dominant region: leave the image alone
        return 0, H, 0, W
    region = lab == sizes.argmax() + 1
    rows, cols = np.nonzero(region.any(1))[0], np.nonzero(region.any(0))[0]
    return (rows[0] * step, min(H, (rows[-1] + 1) * step),
            cols[0] * step, min(W, (cols[-1] + 1) * step))


def crop_pair(gray: np.ndarray, mask: np.ndarray | None):
    """Crop image and mask to the imaging box, grown to cover the whole lesion if needed."""
    t, b, l, r = imaging_box(gray)
    if mask is not None and mask.any():
        rows, cols = np.nonzero(mask.any(1))[0], np.nonzero(mask.any(0))[0]
        t, b, l, r = min(t, rows[0]), max(b, rows[-1] + 1), min(l, cols[0]), max(r, cols[-1] + 1)
    return gray[t:b, l:r], None if mask is None else mask[t:b, l:r]


# ----------------------------------------------------------------------------- augmentation
def _level(lo: float, hi: float) -> float:
    return hi - (hi - lo) * random.random()      # the official code's draw, in (lo, hi]


def _bits(lo: int, hi: int) -> int:
    return hi - max(1, int(np.ceil((hi - lo) * random.random())))


PHOTOMETRIC = (  # the official strong-augmentation list with its ranges
    lambda im: im,
    ImageOps.autocontrast,
    ImageOps.equalize,
    lambda im: im.filter(ImageFilter.GaussianBlur(radius=random.uniform(0.75, 1.25))),
    lambda im: ImageEnhance.Contrast(im).enhance(_level(0.75, 1.25)),
    lambda im: ImageEnhance.Brightness(im).enhance(_level(0.75, 1.25)),
    lambda im: ImageEnhance.Sharpness(im).enhance(_level(0.75, 1.25)),
    lambda im: ImageOps.posterize(im, _bits(4, 8)),
    lambda im: ImageOps.solarize(im, _bits(1, 256)),
)


def _resized_crop(im, mask, size: int):
    # Scale up to 1.2 cannot fit: get_params then falls back to the whole (square) image.
    i, j, h, w = T.RandomResizedCrop.get_params(im, scale=(0.8, 1.2), ratio=(1.0, 1.0))
    im = TF.resized_crop(im, i, j, h, w, [size, size], T.InterpolationMode.BILINEAR)
    if mask is not None:
        mask = TF.resized_crop(mask, i, j, h, w, [size, size], T.InterpolationMode.NEAREST)
    return im, mask


GEOMETRIC = (  # the official weak-augmentation list; each op transforms image and mask alike
    _resized_crop,
    lambda im, m, s: (TF.hflip(im), None if m is None else TF.hflip(m)),
    lambda im, m, s: (TF.vflip(im), None if m is None else TF.vflip(m)),
    lambda im, m, s: (im, m),
)


def augment(im: Image.Image, mask: Image.Image | None, size: int):
    """With p = 0.5: 0-9 photometric ops (image only), then 0-4 geometric ops (both), each
    drawn with replacement, as the official code. Python's `random` and torch's RNG are seeded
    per DataLoader worker by torch, so workers do not repeat each other."""
    if random.random() >= 0.5:
        return im, mask
    for op in random.choices(PHOTOMETRIC, k=random.randint(0, len(PHOTOMETRIC))):
        im = op(im)
    for op in random.choices(GEOMETRIC, k=random.randint(0, len(GEOMETRIC))):
        im, mask = op(im, mask, size)
    return im, mask


# ----------------------------------------------------------------------------- data set
def to_tensor(im: Image.Image, clip_norm: bool) -> torch.Tensor:
    """uint8 grayscale [S, S] -> float [3, S, S], CLIP-normalised or in [0, 1]."""
    # In numpy, in one pass: small torch ops in a loader process cost more than the maths.
    mean, std = (_MEAN_STD if clip_norm else _RAW)
    x = np.asarray(im, dtype=np.float32)[None] / 255.0         # [S, S] -> [1, S, S]
    return torch.from_numpy((x - mean) / std)                  # [1, S, S] -> [3, S, S]


_MEAN_STD = (np.float32(CLIP_MEAN).reshape(3, 1, 1), np.float32(CLIP_STD).reshape(3, 1, 1))
_RAW = (np.zeros((3, 1, 1), np.float32), np.ones((3, 1, 1), np.float32))


class UltrasoundDataset(Dataset):
    """Items -> dict(image=[3,S,S] float, mask=[S,S] long 0/1 (seg only), label, path)."""

    def __init__(self, items: list[Item], cfg: DataConfig, train: bool = False):
        self.items, self.cfg = list(items), cfg
        self.augment = train and cfg.train_aug

    def __len__(self) -> int:
        return len(self.items)

    def load(self, it: Item) -> tuple[Image.Image, Image.Image | None]:
        """Decoded, cropped and resized image (and mask) as PIL images, before augmentation."""
        gray = read_gray(it.image)
        mask = None
        if self.cfg.task == "seg":
            mask, _ = read_mask(it.masks, gray.shape, it.image, self.cfg.mask_threshold)
        if self.cfg.crop:
            gray, mask = crop_pair(gray, mask)
        S = self.cfg.size
        im = Image.fromarray(gray).resize((S, S), Image.Resampling.BILINEAR)
        if mask is not None:
            mask = Image.fromarray(mask.astype(np.uint8) * 255).resize((S, S), Image.Resampling.NEAREST)
        return im, mask

    def __getitem__(self, i: int) -> dict:
        it = self.items[i]
        im, mask = self.load(it)
        if self.augment:
            im, mask = augment(im, mask, self.cfg.size)
        out = {"image": to_tensor(im, self.cfg.clip_norm), "label": it.label, "path": str(it.image)}
        if mask is not None:
            out["mask"] = torch.from_numpy((np.asarray(mask) > 127).astype(np.int64))
        return out


def _resolve_root(cfg: DataConfig) -> Path:
    if cfg.dataset not in LAYOUTS:
        raise DataError(f"unknown dataset {cfg.dataset!r}; choose one of {', '.join(LAYOUTS)}")
    if cfg.task not in ("seg", "cls"):
        raise DataError(f"unknown task {cfg.task!r}; use 'seg' or 'cls'")
    if cfg.dataset == "phantom":
        return phantom_root(cfg)
    if not cfg.root:
        raise DataError(f"dataset {cfg.dataset!r} needs a root folder (--data-root)")
    root = Path(cfg.root)
    if not root.is_dir():
        raise DataError(f"{root}: data folder not found; check --data-root")
    return root


def _get_split(items, predefined, root: Path, cfg: DataConfig, bad: _Bad) -> tuple[dict, str]:
    path = Path(cfg.split_path) if cfg.split_path else None
    if path is not None and path.is_file():
        return load_split(path, root, items, bad), f"reused {path}"
    split, how = make_split(items, predefined, cfg.seed)
    if path is not None:
        write_json(path, {"dataset": cfg.dataset, "root": str(root), "task": cfg.task,
                          "seed": cfg.seed, "how": how, **split}, indent=1)
    return split, how


def build_datasets(cfg: DataConfig):
    """(train, val, test, info): three UltrasoundDatasets (augmentation on train only) and a
    summary dict (root, split source, counts per split and class, skipped files, non-binary
    masks)."""
    root = _resolve_root(cfg)
    bad = _Bad(cfg.skip_bad)
    items, predefined = SCANNERS[cfg.dataset](root, cfg, bad)
    nonbinary, example = 0, ""
    if cfg.check_files:
        items, nonbinary, example = check_items(items, cfg, bad)
    if not items:
        raise DataError(f"{root}: no usable images ({len(bad.messages)} skipped as bad)")
    if nonbinary:
        warnings.warn(f"{nonbinary} mask(s) are not binary (e.g. {example}); thresholded at "
                      f"> {cfg.mask_threshold}", stacklevel=2)
    split, how = _get_split(items, predefined, root, cfg, bad)
    by_key = {it.key: it for it in items}
    sets = {k: UltrasoundDataset([by_key[key] for key in split[k]], cfg, train=k == "train")
            for k in ("train", "val", "test")}
    info = _summary(cfg, root, how, sets, bad, nonbinary)
    if bad.messages:
        warnings.warn(f"skipped {len(bad.messages)} bad file(s), e.g. {bad.messages[0]}", stacklevel=2)
    return sets["train"], sets["val"], sets["test"], info


def _summary(cfg, root, how, sets, bad, nonbinary) -> dict:
    names = CLASSES[:3 if cfg.keep_normal else 2]
    counts = {k: {(names[y] if 0 <= y < len(names) else "unlabelled"): 0 for y in
                  sorted({it.label for it in ds.items})} for k, ds in sets.items()}
    for k, ds in sets.items():
        for it in ds.items:
            counts[k][names[it.label] if 0 <= it.label < len(names) else "unlabelled"] += 1
    return {"dataset": cfg.dataset, "root": str(root), "task": cfg.task, "classes": list(names),
            "split": how, "split_path": cfg.split_path, "counts": counts,
            "skipped": len(bad.messages), "skipped_files": bad.messages[:20],
            "nonbinary_masks": nonbinary}
