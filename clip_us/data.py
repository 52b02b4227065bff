"""Ultrasound data sets: folder layouts, seeded splits, preprocessing, augmentation, and a count
of every image that is dropped or repaired on the way.

The ultrasound-CLIP paper (§4.2): non-imaging regions with overlay annotations are cropped away,
images are resized to 224 x 224, the data are split 8:1:1 (TN3K and Prostate: their test set is kept
and the rest split 8:2), stratified by label (clip_us/splits.py makes every split). Resizing is
bicubic, PIL's default, as the official code (jinggqu/NextGen-UIA) does; masks are resized nearest
(the official masks are PIL mode "1", which PIL always resizes nearest). The augmentation is the
official code's (`dataset_seg.py`): with p = 0.5, a random number of photometric operations, then a
random number of geometric ones (random resized crop with scale (0.8, 1.2) and ratio 1, horizontal
flip, vertical flip, identity), the geometric ones applied identically to image and mask.

Layouts (`DataConfig.dataset`):
- busi:      {benign,malignant[,normal]}/<class> (N).png, masks <class> (N)_mask.png, _mask_1.png, ...
- nextgen:   all/images, all/masks, segmentation/<DS>/{train,val,test}.txt,
             classification/<DS>/labels.csv and split files (the NextGen-UIA release; its images
             come pre-cropped, so they are not cropped again unless crop=True)
- prostate:  the nextgen layout with <DS> = prostate (2-D PNG slices)
- tn3k:      trainval-image/, trainval-mask/, test-image/, test-mask/
- ddti, folder: images/ and masks/ matched by file stem, optional labels.csv (image,label)
- phantom:   clip_us.phantom written once into a cache folder, then read as busi

Labels: benign 0, malignant 1 (the positive class); normal 2 only with keep_normal. Images the
layout gives no label get -1 (segmentation-only data sets).

Masks: a mask means the same whatever its file format (L, RGB, RGBA, LA, palette, 16-bit): its
colour channels are read, and alpha only when the colour is the same everywhere. A pixel is
lesion when it reaches half of its mask's maximum (`mask_threshold`), so blurred, anti-aliased or
JPEG masks keep their true outline; such masks are counted as repaired.

Bad data never becomes a silent result: every image found is used, or counted with its reason
in `info["health"]` (skipped as bad, left out as normal, duplicate stem, not in the split file),
and repaired and empty masks are counted too; a saved split.json is reused only for the data set
it was made for.

    train, val, test, info = build_datasets(DataConfig(dataset="busi", root="data/BUSI", task="seg"))
    sample = train[0]  # dict(image=[3,S,S] float, mask=[S,S] long (seg), label=int, path=str)
"""
from __future__ import annotations

import csv
import dataclasses
import hashlib
import random
import re
import unicodedata
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

from . import phantom, splits
from .fileio import cache_dir
from .labels import CLASSES, parse_label
from .transform import HIGH_DEPTH_MODES, mean_std, open_image, to_working_image

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
LAYOUTS = ("busi", "nextgen", "prostate", "tn3k", "ddti", "folder", "phantom")
PRECROPPED = ("nextgen", "prostate")   # the NextGen-UIA release ships cropped images
MIN_SIDE = 16       # one ViT patch: a smaller image holds no patch of real pixels
MIN_IMAGES = 20     # the fewest images that split 8:1:1 with no empty part, whatever the classes


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
    keep_normal: bool = False         # BUSI normal images as class 2 (else left out, counted)
    skip_bad: bool = False            # skip bad files (counted in info) instead of raising
    split_path: str | None = None     # the run's split.json: reused if made for this data, else written
    write_split: bool = True          # False: not written here; info["new_split"] holds it for the
    #                                   caller, who writes it when the run starts (runs.RunFolder)
    split_file: str | None = None     # a split JSON to use as it is, whatever data it was made for
    require_split: bool = True        # train, val, test all non-empty (False: evaluate every image)
    nextgen_name: str | None = None   # <DS> of the nextgen layout (default: the only one)
    train_aug: bool = True            # augment the training set
    crop: bool | None = None          # crop the imaging region; None: all but nextgen/prostate
    mask_threshold: float = 0.5       # lesion: value >= this x the mask's maximum (0: any value > 0)
    check_files: bool = True          # decode every file once when building (finds bad files)
    phantom_n: int = 200              # phantom: number of images
    phantom_size: int = 256           # phantom: side of the generated images
    phantom_seed: int = 0             # phantom: generator seed (independent of the split seed)
    phantom_organs: tuple = ("breast",)   # phantom: BUSI stand-in by default


@dataclass(frozen=True)
class Item:
    key: str                  # path relative to the data set root (NFC), as split files store it
    image: Path
    masks: tuple = ()         # mask files; their union is the lesion mask
    label: int = -1


class Tally:
    """What became of every image found. A fault raises at once, or with skip_bad the image is
    skipped and counted, once however many faults it has. Label rows and split entries that name
    no image are counted apart from images."""

    def __init__(self, skip: bool):
        self.skip, self.messages = skip, []
        self.found, self.skipped, self.duplicates, self.normal = set(), set(), set(), set()
        self.bad_rows = self.missing_entries = self.duplicate_rows = 0

    def fault(self, msg: str) -> None:
        if not self.skip:
            raise DataError(msg + ". Fix or remove the file, or pass --skip-bad (skip_bad=True) "
                                  "to skip bad files.")
        self.messages.append(msg)

    def image(self, path, msg: str) -> None:
        """An image that cannot be used; `msg` names it."""
        self.fault(msg)
        self.skipped.add(Path(path))

    def images(self, paths, msg: str) -> None:
        """Many images with one fault (e.g. no masks folder), said once."""
        self.fault(f"{msg} ({len(paths)} images)")
        self.skipped.update(Path(p) for p in paths)

    def row(self, where, what: str) -> None:
        self.fault(f"{where}: {what}")
        self.bad_rows += 1

    def entry(self, where, what: str) -> None:
        self.fault(f"{where}: {what}")
        self.missing_entries += 1


def nfc(name: str) -> str:
    """Unicode NFC: a name typed on one system matches the same name stored by another (macOS
    stores NFD)."""
    return unicodedata.normalize("NFC", name)


def read_text(path: Path) -> str:
    """A text file as UTF-8 with any byte-order mark removed (Excel writes one)."""
    return path.read_text(encoding="utf-8-sig")


# ----------------------------------------------------------------------------- decoding
def read_gray(path) -> np.ndarray:
    """Any PNG/JPEG/BMP/TIFF as uint8 grayscale [H, W]: RGB(A) and palette images go through
    luminance, alpha is dropped; high-bit-depth images are scaled as clip_us.transform does."""
    try:
        im = open_image(path)
    except ValueError as e:
        raise DataError(f"{e}; the file is corrupt, truncated or not an image") from e
    if im.mode in HIGH_DEPTH_MODES:
        return np.round(np.asarray(to_working_image(im))).astype(np.uint8)   # "F" in [0, 255]
    return np.asarray(im.convert("L"))


GRAY_MASK_MODES = ("1", "L") + HIGH_DEPTH_MODES


def _colour_or_alpha(a: np.ndarray, n_colour: int) -> np.ndarray:
    """[H, W, C] -> [H, W]: the largest colour channel (a red-on-black mask is foreground);
    alpha only when the colour is the same everywhere (white lesion on transparent)."""
    colour = a[..., :n_colour].max(-1)
    if a.shape[-1] > n_colour and colour.min() == colour.max():
        return a[..., n_colour]
    return colour


def read_mask_values(path) -> np.ndarray:
    """A mask file's values [H, W], the same for the same mask saved as L, RGB, RGBA, LA,
    palette or 16-bit: colour channels first, alpha only when the colour carries nothing."""
    try:
        im = open_image(path)
    except ValueError as e:
        raise DataError(f"{path}: cannot be read as a mask ({e})") from e
    if im.mode in GRAY_MASK_MODES:
        return np.asarray(im)
    if im.mode == "LA":
        return _colour_or_alpha(np.asarray(im), 1)
    has_alpha = "A" in im.mode or "transparency" in im.info
    return _colour_or_alpha(np.asarray(im.convert("RGBA" if has_alpha else "RGB")), 3)


def is_binary(values: np.ndarray) -> bool:
    """0 plus at most one foreground value (0/1, 0/255 and bool masks are binary)."""
    fg = values[values > 0]
    return fg.size == 0 or fg.min() == fg.max()


def binarize(values: np.ndarray, fraction: float = 0.5) -> np.ndarray:
    """Lesion pixels: value >= fraction x the mask's maximum (and > 0). Half the maximum puts a
    blurred or anti-aliased edge where the sharp one was; fraction 0 takes any value > 0."""
    v = values.astype(np.float32)
    return (v > 0) & (v >= fraction * v.max()) if v.size else v > 0


def read_mask(masks, shape, image_path, threshold: float = 0.5) -> tuple[np.ndarray, bool]:
    """Union of the mask files as bool [H, W], and whether every file was binary."""
    union, binary = np.zeros(shape, bool), True
    for m in masks:
        v = read_mask_values(m)
        if v.shape != tuple(shape):
            raise DataError(f"{m}: mask is {v.shape[1]}x{v.shape[0]} (WxH) but its image "
                            f"{image_path} is {shape[1]}x{shape[0]}; masks must match their image")
        binary &= is_binary(v)
        union |= binarize(v, threshold)
    return union, binary


# ----------------------------------------------------------------------------- listing
def _image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTS) \
        if folder.is_dir() else []


def list_images(folder: Path) -> list[Path]:
    """Image files directly in `folder`, sorted; an empty or missing folder is an error."""
    if folder.is_file():
        raise DataError(f"{folder}: is a file, not a folder; check --data-root and --dataset")
    if not folder.is_dir():
        raise DataError(f"{folder}: folder not found; check --data-root and --dataset")
    files = _image_files(folder)
    if not files:
        raise DataError(f"{folder}: no images ({', '.join(IMAGE_EXTS)}) in this folder; "
                        f"check --data-root and --dataset")
    return files


def take_images(files: list[Path], tally: Tally) -> list[Path]:
    """Count the images found and drop those that share a stem: x.png and x.jpg (one picture
    saved twice) would pair with one mask and could land in two splits. An error naming both,
    or with skip_bad both are left out and counted as duplicates."""
    tally.found.update(files)
    groups: dict[str, list] = {}
    for f in files:
        groups.setdefault(nfc(f.stem), []).append(f)
    for same in (g for g in groups.values() if len(g) > 1):
        tally.fault(f"{' and '.join(map(str, same))} share the stem {same[0].stem!r}: the same "
                     f"picture saved twice would pair with one mask and could land in two "
                     f"splits; keep one of them")
        tally.duplicates.update(same)
    return [f for f in files if f not in tally.duplicates]


def key_of(root: Path, path: Path) -> str:
    return nfc(path.relative_to(root).as_posix())


def missing_masks(images: list[Path], mask_dir: Path | None, tally: Tally) -> None:
    """Segmentation images without a mask; a missing masks folder is said once."""
    if mask_dir is None or not mask_dir.is_dir():
        tally.images(images, f"{mask_dir}: masks folder not found; segmentation needs one mask "
                             f"per image")
        return
    for img in images:
        tally.image(img, f"{img}: no mask for this image in {mask_dir} (expected {img.stem}.png "
                         f"or {img.stem}_mask.png); segmentation needs one")


# ----------------------------------------------------------------------------- labels.csv
def _is_header(path: Path, first: list[str]) -> bool:
    """Whether labels.csv's first row is its header image,label. A row whose label is known, or
    whose first cell is an image file, is data (a bad label there is that row's fault); any other
    first row names columns, and columns other than image,label are an error, not a bad label."""
    cells = [c.strip() for c in first]
    if [c.lower() for c in cells[:2]] == ["image", "label"]:
        return True
    labelled = len(cells) > 1 and parse_label(cells[1]) is not None
    if labelled or Path(cells[0]).suffix.lower() in IMAGE_EXTS:
        return False
    raise DataError(f"{path}: columns {', '.join(cells)} found, expected image,label (the image "
                    f"file name, then benign, malignant or normal, or 0, 1, 2); rename the header "
                    f"row to image,label")


def read_labels_csv(path: Path, tally: Tally) -> list[tuple[int, str, int, str]]:
    """labels.csv (image,label; header optional; a byte-order mark is removed) as rows
    (row number, NFC image name, label, row text); a row with an unknown label is a bad row,
    other column names than image,label an error."""
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f)
        rows = [(reader.line_num, r) for r in reader if r and any(c.strip() for c in r)]
    if rows and _is_header(path, rows[0][1]):
        rows = rows[1:]
    out = []
    for n, row in rows:
        label = parse_label(row[1]) if len(row) >= 2 else None
        if label is None:
            tally.row(f"{path} (row {n}: {','.join(row)})", "unknown or missing label; use "
                      "benign, malignant or normal, or 0, 1, 2")
            continue
        out.append((n, nfc(row[0].strip()), label, ",".join(row)))
    return out


def labels_by(rows, key, where: Path, tally: Tally) -> dict:
    """{key(name): label} from labels.csv rows; key(name) None = the row names no image (a bad
    row). One image twice: with the same label a duplicate row (counted and warned), with two
    labels an error naming both rows."""
    out, first = {}, {}
    for n, name, label, text in rows:
        k = key(name)
        if k is None:
            tally.row(f"{where} (row {n}: {text})", f"names {name!r}, which is not among the images")
        elif k not in out:
            out[k], first[k] = label, (n, text)
        elif out[k] == label:
            tally.duplicate_rows += 1
        else:
            raise DataError(f"{where}: rows {first[k][0]} ({first[k][1]}) and {n} ({text}) give "
                            f"one image two labels; keep the right row and delete the other")
    return out


def attach_labels(pairs, csv_path: Path, tally: Tally) -> list[int]:
    """Each pair's label from labels.csv, matched by file name or stem (NFC); -1 = none. Rows
    naming an image dropped as a duplicate are ignored, not counted twice."""
    index = {}
    for i, (p, *_) in enumerate(pairs):
        index[nfc(p.name)] = index[nfc(p.stem)] = i
    dropped = {nfc(n) for d in tally.duplicates for n in (d.name, d.stem)}

    def key(name):
        base = Path(name).name
        i = index.get(base, index.get(Path(base).stem))
        return ("duplicate", base) if i is None and {base, Path(base).stem} & dropped else i
    found = labels_by(read_labels_csv(csv_path, tally), key, csv_path, tally)
    return [found.get(i, -1) for i in range(len(pairs))]


# ----------------------------------------------------------------------------- layouts
def pair_by_stem(img_dir: Path, mask_dir: Path | None, task: str, tally: Tally) -> list[tuple]:
    """[(image, masks, mask_dir)] for every image, masks matched by stem (a `_mask` suffix is
    allowed); an image without a mask gets () and is judged by its task later."""
    masks: dict[str, list] = {}
    for m in _image_files(mask_dir) if mask_dir is not None else []:
        masks.setdefault(nfc(re.sub(r"_mask$", "", m.stem)), []).append(m)
    out = []
    for p in take_images(list_images(img_dir), tally):
        found = masks.get(nfc(p.stem), [])
        if task == "seg" and len(found) > 1:
            tally.image(p, f"{p}: {len(found)} masks match it ({', '.join(m.name for m in found)}); "
                           f"keep one")
            continue
        out.append((p, tuple(found), mask_dir))
    return out


def _labelled_pairs(root: Path, pairs, cfg: DataConfig, tally: Tally) -> list[Item]:
    """Items from (image, masks, mask_dir), labelled from root/labels.csv when it exists;
    normal images are left out (counted) unless kept, unlabelled or maskless ones are bad."""
    csv_path = root / "labels.csv"
    labels = attach_labels(pairs, csv_path, tally) if csv_path.is_file() else [-1] * len(pairs)
    if cfg.task == "cls" and all(y == -1 for y in labels):
        raise DataError(f"{root}: no labels.csv (columns image,label) with labels, so no classes "
                        f"to classify; use task 'seg' or add labels.csv")
    items, maskless = [], {}
    for (img, masks, mask_dir), label in zip(pairs, labels):
        if label == 2 and not cfg.keep_normal:
            tally.normal.add(img)
        elif cfg.task == "cls" and label == -1:
            tally.image(img, f"{img}: no label in {csv_path}")
        elif cfg.task == "seg" and not masks:
            maskless.setdefault(mask_dir, []).append(img)
        else:
            items.append(Item(key_of(root, img), img, masks, label))
    for mask_dir, images in maskless.items():
        missing_masks(images, mask_dir, tally)
    return items


BUSI_MASK = re.compile(r"^(?P<stem>.+)_mask(_\d+)?$")


def _busi_folder(folder: Path, tally: Tally) -> tuple[list[Path], dict]:
    """One BUSI class folder: its images (duplicate stems dropped) and {stem: mask files}."""
    files = _image_files(folder)
    masks: dict[str, list] = {}
    for f in files:
        m = BUSI_MASK.match(f.stem)
        if m:
            masks.setdefault(nfc(m["stem"]), []).append(f)
    return take_images([f for f in files if not BUSI_MASK.match(f.stem)], tally), masks


def scan_busi(root: Path, cfg: DataConfig, tally: Tally):
    """BUSI as downloaded; the union of `_mask`, `_mask_1`, ... is the lesion. Its normal
    images are left out and counted unless keep_normal."""
    if not any((root / c).is_dir() for c in CLASSES[:3 if cfg.keep_normal else 2]):
        raise DataError(f"{root}: not a BUSI folder (expected benign/ and malignant/ inside)")
    items = []
    for label, cls in enumerate(CLASSES):
        if (root / cls).is_dir() and (label < 2 or cfg.keep_normal):
            list_images(root / cls)                  # an empty class folder is an error
        images, masks = _busi_folder(root / cls, tally)
        if label == 2 and not cfg.keep_normal:
            tally.normal.update(images)
            continue
        for f in images:
            if cfg.task == "seg" and nfc(f.stem) not in masks:
                tally.image(f, f"{f}: no mask file (expected '<name>_mask.png' beside it); "
                               f"segmentation needs one")
                continue
            items.append(Item(key_of(root, f), f, tuple(masks.get(nfc(f.stem), ())), label))
    return items, None


def _read_split_txt(folder: Path) -> dict[str, list[str]]:
    return {s: [nfc(ln.strip()) for ln in read_text(folder / f"{s}.txt").splitlines() if ln.strip()]
            for s in ("train", "val", "test") if (folder / f"{s}.txt").is_file()}


def _nextgen_name(root: Path, cfg: DataConfig) -> str:
    want = cfg.nextgen_name or ("prostate" if cfg.dataset == "prostate" else None)
    kind = "segmentation" if cfg.task == "seg" else "classification"
    names = sorted(p.name for p in (root / kind).iterdir() if p.is_dir()) if (root / kind).is_dir() else []
    match = [n for n in names if want is None or n.lower() == want.lower()]
    if len(match) != 1:
        raise DataError(f"{root / kind}: cannot pick the data set (asked {want!r}, found {names}); "
                        f"pass --nextgen-name (nextgen_name)")
    return match[0]


def _nextgen_listed(root: Path, split: dict, kind_dir: Path, tally: Tally) -> dict[str, Path]:
    """{name: image} for the split files' names, in order; names of missing files are bad
    entries, duplicate stems are dropped."""
    images = {nfc(p.name): p for p in list_images(root / "all" / "images")}
    listed = {}
    for part, names in split.items():
        for n in names:
            if n not in images:
                tally.entry(kind_dir / f"{part}.txt", f"names {n!r}, which is missing from "
                                                      f"{root / 'all' / 'images'}")
            listed.setdefault(n, images.get(n))
    kept = set(take_images([p for p in listed.values() if p is not None], tally))
    return {n: p for n, p in listed.items() if p in kept}


def scan_nextgen(root: Path, cfg: DataConfig, tally: Tally):
    """The NextGen-UIA release: images and masks share a file name under all/."""
    name = _nextgen_name(root, cfg)
    kind_dir = root / ("segmentation" if cfg.task == "seg" else "classification") / name
    split = _read_split_txt(kind_dir)
    labels_csv = root / "classification" / name / "labels.csv"
    rows = read_labels_csv(labels_csv, tally) if labels_csv.is_file() else []
    labels = labels_by(rows, lambda n: n, labels_csv, tally)
    if not split and cfg.task == "cls" and labels:
        split = {"all": list(labels)}
    if not split:
        raise DataError(f"{kind_dir}: no train.txt/val.txt/test.txt (or labels.csv) found")
    splits.check_disjoint(split, kind_dir, DataError)
    mask_dir = root / "all" / "masks"
    masks = {nfc(p.name): p for p in _image_files(mask_dir)}
    items, maskless = [], []
    for n, img in _nextgen_listed(root, split, kind_dir, tally).items():
        label = labels.get(n, -1)
        if label == 2 and not cfg.keep_normal:
            tally.normal.add(img)
        elif cfg.task == "cls" and label == -1:
            tally.image(img, f"{img}: no label in {labels_csv}")
        elif cfg.task == "seg" and n not in masks:
            maskless.append(img)
        else:
            items.append(Item(f"all/images/{n}", img, (masks[n],) if n in masks else (), label))
    if maskless:
        missing_masks(maskless, mask_dir, tally)
    keys = {it.key for it in items}
    predefined = {p: [f"all/images/{n}" for n in ns if f"all/images/{n}" in keys]
                  for p, ns in split.items() if p != "all"}
    return items, predefined or None


def scan_tn3k(root: Path, cfg: DataConfig, tally: Tally):
    """TN3K: the predefined test set is kept; trainval is split 8:2 later."""
    trainval = pair_by_stem(root / "trainval-image", root / "trainval-mask", cfg.task, tally)
    test = pair_by_stem(root / "test-image", root / "test-mask", cfg.task, tally)
    items = _labelled_pairs(root, trainval + test, cfg, tally)
    test_keys = {key_of(root, p) for p, *_ in test}
    return items, {"test": [it.key for it in items if it.key in test_keys]}


def _sub(root: Path, *names) -> Path:
    """The first of `names` that exists under root (images/ or image/, ...)."""
    return next((root / n for n in names if (root / n).is_dir()), root / names[0])


def scan_folder(root: Path, cfg: DataConfig, tally: Tally):
    """DDTI and any plain layout: images/ + masks/ by stem, optional labels.csv."""
    pairs = pair_by_stem(_sub(root, "images", "image"), _sub(root, "masks", "mask"), cfg.task, tally)
    return _labelled_pairs(root, pairs, cfg, tally), None


def phantom_root(cfg: DataConfig) -> Path:
    """The phantom's folder: cfg.root, or a folder named by its settings in the cache
    (clip_us.fileio.cache_dir: $CLIP_US_CACHE, default ~/.cache/clip_us)."""
    if cfg.root:
        return Path(cfg.root)
    organs = "+".join(o.replace(" ", "_") for o in cfg.phantom_organs)
    normal = "-normal" if cfg.keep_normal else ""
    name = f"n{cfg.phantom_n}-s{cfg.phantom_size}-seed{cfg.phantom_seed}-{organs}{normal}"
    return Path(cache_dir()) / "phantom" / name


def scan_phantom(root: Path, cfg: DataConfig, tally: Tally):
    """Write the phantom (BUSI layout) if the folder has none yet, then read it as BUSI."""
    if not (root / "metadata.jsonl").is_file():
        pcfg = phantom.PhantomConfig(size=cfg.phantom_size, n=cfg.phantom_n, seed=cfg.phantom_seed,
                                     organs=tuple(cfg.phantom_organs),
                                     p_normal=0.17 if cfg.keep_normal else 0.0)
        phantom.write_dataset(root, pcfg)
    return scan_busi(root, cfg, tally)


SCANNERS = {"busi": scan_busi, "nextgen": scan_nextgen, "prostate": scan_nextgen,
            "tn3k": scan_tn3k, "ddti": scan_folder, "folder": scan_folder, "phantom": scan_phantom}


# ----------------------------------------------------------------------------- checking
def _check_side(gray: np.ndarray, path) -> None:
    H, W = gray.shape
    if min(H, W) < MIN_SIDE:
        raise DataError(f"{path}: image is {W}x{H} pixels, smaller than one {MIN_SIDE}-pixel "
                        f"patch, so it holds no usable detail")


def check_items(items: list[Item], cfg: DataConfig, tally: Tally) -> tuple[list[Item], dict]:
    """Decode every image (and mask, for seg) once: unreadable files and images smaller than a
    patch are faults. Non-binary masks (thresholded) and empty masks are counted, with an
    example of each."""
    good, stats = [], {"masks_repaired": 0, "empty_masks": 0, "repaired": "", "empty": ""}
    for it in items:
        try:
            gray = read_gray(it.image)
            _check_side(gray, it.image)
            if cfg.task == "seg":
                mask, binary = read_mask(it.masks, gray.shape, it.image, cfg.mask_threshold)
        except DataError as e:
            tally.image(it.image, str(e))
            continue
        if cfg.task == "seg":
            stats["masks_repaired"] += not binary
            stats["repaired"] = stats["repaired"] or ("" if binary else str(it.masks[0]))
            stats["empty_masks"] += not mask.any()
            stats["empty"] = stats["empty"] or ("" if mask.any() else str(it.image))
        good.append(it)
    return good, stats


# ----------------------------------------------------------------------------- splits
def make_split(items: list[Item], predefined, seed: int) -> tuple[dict, str]:
    """{"train", "val", "test": [keys]} and how it was made: the layout's own parts, else 8:1:1
    stratified by label (TN3K / Prostate: their test set kept, the rest 8:2), in item order."""
    if predefined and set(splits.PARTS) <= predefined.keys():
        return {k: list(predefined[k]) for k in splits.PARTS}, "predefined train/val/test"
    labels = {it.key: it.label for it in items}
    if predefined and "test" in predefined:
        test = set(predefined["test"])
        rest = [it.key for it in items if it.key not in test]
        parts = splits.in_order(splits.stratified(rest, labels, (0.8, 0.2), seed), rest)
        return {**parts, "test": [it.key for it in items if it.key in test]}, \
            "predefined test, rest 8:2 stratified"
    keys = [it.key for it in items]
    return splits.in_order(splits.stratified(keys, labels, (0.8, 0.1, 0.1), seed), keys), \
        "8:1:1 stratified"


def fingerprint(items: list[Item]) -> str:
    """A short hash of the item list (keys and labels): equal only for the same data."""
    h = hashlib.sha256()
    for key, label in sorted((it.key, it.label) for it in items):
        h.update(f"{key}\t{label}\n".encode())
    return h.hexdigest()[:16]


def check_same_data(saved: dict, path: Path, root: Path, items: list[Item]) -> None:
    """A run folder's split.json is reused only for the data it was made for: the same root
    and the same item list. Anything else would leave images out silently."""
    now = {"root": str(root.resolve()), "fingerprint": fingerprint(items), "n_items": len(items)}
    if all(saved.get(k) == now[k] for k in ("root", "fingerprint")):
        return
    then = {k: saved.get(k, "not recorded") for k in now}
    raise DataError(f"{path} was made for other data ({then['root']}, {then['n_items']} images, "
                    f"fingerprint {then['fingerprint']}) than this run's ({now['root']}, "
                    f"{now['n_items']} images, fingerprint {now['fingerprint']}); reusing it would "
                    f"leave images out silently. Pass a new --out-dir to make a new split, or "
                    f"--split-file {path} to use this split anyway")


def load_split(saved: dict, path: Path, root: Path, items: list[Item], tally: Tally) -> dict:
    """A saved split; entries naming missing files are bad, entries whose files exist but were
    skipped or left out (e.g. normal images) are dropped."""
    parts = {k: list(dict.fromkeys(nfc(x) for x in saved[k])) for k in splits.PARTS}
    splits.check_disjoint(parts, path, DataError)
    known = {it.key for it in items}
    for name, keys in parts.items():
        for k in keys:
            if k not in known and not (root / k).is_file():
                tally.entry(path, f"the {name} split names {k!r}, which is missing from {root}")
    return splits.keep(parts, known)


def get_split(items, predefined, root: Path, cfg: DataConfig, tally: Tally):
    """(split, how, whether to save it): cfg.split_file as it is; else the run's split.json when
    it was made for this data; else a new split."""
    path = Path(cfg.split_path) if cfg.split_path else None
    if cfg.split_file:
        src = Path(cfg.split_file)
        if not src.is_file():
            raise DataError(f"{src}: split file not found; check --split-file")
        split = load_split(splits.read_split(src, error=DataError), src, root, items, tally)
        return split, f"from {src}", path is not None and path.resolve() != src.resolve()
    if path is not None and path.is_file():
        saved = splits.read_split(path, error=DataError)
        check_same_data(saved, path, root, items)
        return load_split(saved, path, root, items, tally), f"reused {path}", False
    split, how = make_split(items, predefined, cfg.seed)
    return split, how, path is not None


def split_record(how: str, items: list[Item], root: Path, cfg: DataConfig) -> dict:
    """What split.json holds besides the parts: the data it belongs to (see check_same_data)."""
    return {"dataset": cfg.dataset, "root": str(root.resolve()), "task": cfg.task, "seed": cfg.seed,
            "how": how, "n_items": len(items), "fingerprint": fingerprint(items)}


# ----------------------------------------------------------------------------- preprocessing
def imaging_box(gray: np.ndarray, threshold: int = 10) -> tuple[int, int, int, int]:
    """(top, bottom, left, right) of the scanner's image: everything but the uniform black
    margins around it and the text, rulers and calipers drawn in them.

    A margin is uniform black: a 3 x 3 window belongs to it when it is dark (<= threshold) and
    at least 5 of its 9 pixels hold the image's darkest value exactly. Tissue is never that
    flat, however dark: an anechoic cyst, an acoustic shadow or a dark layer keeps its speckle,
    so it stays in the image (and mild JPEG noise leaves most of a margin black). The rest,
    opened with a 5 x 5 square to erase thin strokes (text, ruler ticks, calipers), has the
    image as its largest connected region. The whole image when nothing large is found."""
    H, W = gray.shape
    step = max(1, max(H, W) // 256)            # the box needs no more than ~256 px resolution
    g = gray[::step, ::step]
    black = (g <= g.min()).astype(np.float32)
    window = (ndimage.maximum_filter(g, size=3) <= threshold) & \
        (ndimage.uniform_filter(black, size=3) > 0.5)
    fg = ~ndimage.maximum_filter(window, size=3)   # every pixel of a margin window
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
    # torchvision's RandomResizedCrop default (bilinear) for the image, as the official code
    # uses that transform; the initial resize in UltrasoundDataset.load is PIL's bicubic.
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
    mean, std = _NORM[bool(clip_norm)]
    x = np.asarray(im, dtype=np.float32)[None] / 255.0         # [S, S] -> [1, S, S]
    return torch.from_numpy((x - mean) / std)                  # [1, S, S] -> [3, S, S]


_NORM = {norm: tuple(np.float32(v).reshape(3, 1, 1) for v in mean_std(norm))  # clip_norm -> arrays
         for norm in (True, False)}


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
        im = Image.fromarray(gray).resize((S, S), Image.Resampling.BICUBIC)   # PIL's default
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


# ----------------------------------------------------------------------------- building
def check_config(cfg: DataConfig) -> None:
    """Settings that cannot work, refused before any file is read or written."""
    if cfg.dataset not in LAYOUTS:
        raise DataError(f"unknown dataset {cfg.dataset!r}; choose one of {', '.join(LAYOUTS)}")
    if cfg.task not in ("seg", "cls"):
        raise DataError(f"unknown task {cfg.task!r}; use 'seg' or 'cls'")
    if cfg.size < MIN_SIDE:
        raise DataError(f"image size {cfg.size} is smaller than one {MIN_SIDE}-pixel patch; "
                        f"use --image-size 224 (the paper's) or another size >= {MIN_SIDE}")
    if not 0 <= cfg.mask_threshold <= 1:
        raise DataError(f"--mask-threshold {cfg.mask_threshold} is not a fraction of the mask's "
                        f"maximum; use a value in [0, 1] (0.5 by default)")
    if cfg.dataset == "phantom" and cfg.require_split and cfg.phantom_n < MIN_IMAGES:
        raise DataError(f"--phantom-n {cfg.phantom_n} is too few images to split 8:1:1 into "
                        f"train, val and test; use at least {MIN_IMAGES}")


def resolve_root(cfg: DataConfig) -> Path:
    if cfg.dataset == "phantom":
        root = phantom_root(cfg)
    elif not cfg.root:
        raise DataError(f"dataset {cfg.dataset!r} needs a root folder (--data-root)")
    else:
        root = Path(cfg.root)
        if not root.is_dir() and not root.is_file():
            raise DataError(f"{root}: data folder not found; check --data-root")
    if root.is_file():
        raise DataError(f"{root}: is a file, not a folder; --data-root takes the folder that "
                        f"holds the data set")
    return root


def _check_split_sizes(sets: dict, how: str, cfg: DataConfig) -> None:
    empty = [k for k, ds in sets.items() if len(ds) == 0]
    if empty and cfg.require_split:
        n = sum(len(ds) for ds in sets.values())
        raise DataError(f"the {' and '.join(empty)} set would be empty: {n} usable images are "
                        f"too few for a {how} split; use at least {MIN_IMAGES} images")


def build_datasets(cfg: DataConfig):
    """(train, val, test, info): three UltrasoundDatasets (augmentation on train only) and a
    summary dict: root, split source, counts per split and class, and info["health"], the
    count of every image dropped or repaired (see health()), and info["new_split"]: a new split
    for `split_path` (its record and parts; None when the split was reused or there is no path),
    written there once every check has passed, unless `write_split` is False."""
    check_config(cfg)
    root = resolve_root(cfg)
    cfg = dataclasses.replace(cfg, crop=cfg.dataset not in PRECROPPED if cfg.crop is None else cfg.crop)
    tally = Tally(cfg.skip_bad)
    items, predefined = SCANNERS[cfg.dataset](root, cfg, tally)
    stats = {}
    if cfg.check_files:
        items, stats = check_items(items, cfg, tally)
    if not items:
        eg = f"; first: {tally.messages[0]}" if tally.messages else ""
        raise DataError(f"{root}: no usable images ({len(tally.skipped)} skipped as bad, "
                        f"{len(tally.normal)} normal left out, {len(tally.duplicates)} "
                        f"duplicates){eg}")
    if stats.get("empty_masks") == len(items):
        raise DataError(f"{root}: every mask is empty (e.g. {stats['empty']}), so there is no "
                        f"lesion to segment; check the masks folder and the mask files")
    split, how, save = get_split(items, predefined, root, cfg, tally)
    by_key = {it.key: it for it in items}
    sets = {k: UltrasoundDataset([by_key[key] for key in split[k]], cfg, train=k == "train")
            for k in ("train", "val", "test")}
    _check_split_sizes(sets, how, cfg)
    info = _summary(cfg, root, how, sets, tally)
    info["new_split"] = {**split_record(how, items, root, cfg), **split} if save else None
    if save and cfg.write_split:
        splits.save_split(Path(cfg.split_path), info["new_split"])
    info["health"] = health(tally, stats, sets, len(items), cfg)
    for line in health_lines(info["health"], tally, stats, cfg):
        warnings.warn(line, stacklevel=2)
    return sets["train"], sets["val"], sets["test"], info


def health(tally: Tally, stats: dict, sets: dict, n_items: int, cfg: DataConfig) -> dict:
    """Flat counts for results.json's "data" block. images_found = images_used + skipped_bad +
    left_out_normal + duplicates + not_in_split. Mask counts are None where masks were not read."""
    used = sum(len(ds) for ds in sets.values())
    masks = cfg.task == "seg" and cfg.check_files
    return {"images_found": len(tally.found), "images_used": used,
            "skipped_bad": len(tally.skipped), "left_out_normal": len(tally.normal),
            "duplicates": len(tally.duplicates), "not_in_split": n_items - used,
            "masks_repaired": stats["masks_repaired"] if masks else None,
            "mask_threshold": cfg.mask_threshold, "mask_threshold_of": "each mask's maximum",
            "empty_masks": stats["empty_masks"] if masks else None,
            "bad_label_rows": tally.bad_rows, "duplicate_label_rows": tally.duplicate_rows,
            "missing_split_entries": tally.missing_entries}


def health_lines(h: dict, tally: Tally, stats: dict, cfg: DataConfig) -> list[str]:
    """One console line per kind of image dropped or repaired."""
    out = []
    if tally.messages:
        parts = [f"{h[k]} {what}" for k, what in (
            ("skipped_bad", "bad image(s)"), ("duplicates", "duplicate(s) sharing a stem"),
            ("bad_label_rows", "bad labels.csv row(s)"),
            ("missing_split_entries", "split entries naming missing files")) if h[k]]
        out.append(f"skipped {', '.join(parts)} (--skip-bad), e.g. {tally.messages[0]}")
    if h["left_out_normal"]:
        out.append(f"left out {h['left_out_normal']} normal image(s); --keep-normal "
                   f"(keep_normal=True) uses them as class 2")
    if h["duplicate_label_rows"]:
        out.append(f"{h['duplicate_label_rows']} exact duplicate labels.csv row(s) ignored")
    if h["masks_repaired"]:
        out.append(f"{h['masks_repaired']} mask(s) are not binary (e.g. {stats['repaired']}); "
                   f"thresholded at {cfg.mask_threshold} x each mask's maximum (--mask-threshold)")
    if h["empty_masks"]:
        out.append(f"{h['empty_masks']} image(s) have an empty mask (e.g. {stats['empty']}); "
                   f"kept, and counted in the results")
    if h["not_in_split"]:
        out.append(f"{h['not_in_split']} image(s) are in no part of the split and are left out")
    return out


def _summary(cfg, root, how, sets, tally) -> dict:
    names = CLASSES[:3 if cfg.keep_normal else 2]
    counts = {k: {(names[y] if 0 <= y < len(names) else "unlabelled"): 0 for y in
                  sorted({it.label for it in ds.items})} for k, ds in sets.items()}
    for k, ds in sets.items():
        for it in ds.items:
            counts[k][names[it.label] if 0 <= it.label < len(names) else "unlabelled"] += 1
    return {"dataset": cfg.dataset, "root": str(root), "task": cfg.task, "classes": list(names),
            "split": how, "split_path": cfg.split_path, "split_file": cfg.split_file,
            "crop": cfg.crop, "counts": counts, "skipped_files": tally.messages[:20]}
