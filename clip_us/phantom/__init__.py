"""Synthetic B-mode ultrasound with lesions, masks, labels and caption attributes: the embedded
default data set, so every script runs offline.

Image formation follows the textbook B-mode chain: complex scatterers weighted by a tissue
reflectivity map are blurred by an anisotropic Gaussian point-spread function, the envelope is
taken and log-compressed to a dynamic range, with depth attenuation. The field of view is a
linear rectangle or a convex sector on black, and overlays (text, a grey bar, a logo, a depth
ruler, a body marker, calipers) sit outside and inside it, as on scanner screenshots, so that
`data.py`'s crop has something to remove.

Lesions follow the descriptors of the zero-shot prompts of the ultrasound-CLIP paper (§4.3) (BI-RADS
lexicon):
- benign: oval, circumscribed, parallel (wider than tall), homogeneous hypoechoic, posterior
  enhancement;
- malignant: irregular with spiculated / angular / microlobulated margins, not parallel (taller
  than wide), heterogeneous hypoechoic, microcalcifications, posterior acoustic shadowing.

Every sample is drawn from its own numpy Generator seeded by (seed, index), so a sample does not
depend on how many came before it. `write_dataset` writes the BUSI layout
(`benign/benign (1).png`, `benign/benign (1)_mask.png`, a second lesion as `_mask_1.png`) plus a
`metadata.jsonl` sidecar, atomically.

    python -m clip_us.phantom --out data/phantom --n 647 --seed 0    # its __main__.py
"""
from __future__ import annotations

import functools
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from scipy import ndimage

from ..labels import CLASSES

ORGANS = ("breast", "thyroid", "lymph node", "liver")


@dataclass
class PhantomConfig:
    size: int = 256                 # square image side in pixels
    n: int = 200                    # images in a data set
    seed: int = 0
    organs: tuple = ORGANS          # drawn uniformly per image
    p_malignant: float = 0.5        # among lesion images
    p_normal: float = 0.0           # fraction of lesion-free "normal" images (BUSI has 17 %)
    p_second_lesion: float = 0.05   # a second lesion, written as `_mask_1.png` (BUSI does this)
    p_sector: float = 0.5           # convex sector field of view, otherwise linear
    p_calipers: float = 0.5         # calipers drawn on the lesion, inside the field of view
    dynamic_range_db: tuple = (45.0, 60.0)


# ----------------------------------------------------------------------------- geometry
def _field_of_view(rng, S: int, sector: bool) -> dict:
    """Pixel maps of the scan geometry: fov (bool), depth d in [0, 1] along the beam and beam
    coordinate u in [-1, 1] across it; plus the bounding box of the field of view."""
    y, x = _grid(S)
    top, bottom = int(0.09 * S), int(rng.uniform(0.86, 0.93) * S)
    if sector:   # convex probe: apex above the image, rays fanning out by +-half angle
        half, r0 = np.deg2rad(rng.uniform(28, 36)), rng.uniform(0.25, 0.45) * S
        for _ in range(2):   # narrow the fan until its deep corners leave room for overlays
            ay = top - r0 * np.cos(half)      # apex row, so the shallow arc's ends touch `top`
            r1 = bottom - ay
            half = min(half, np.arcsin(0.37 * S / r1))
        r = np.hypot(x - S / 2, y - ay)
        ang = np.arctan2(x - S / 2, y - ay)
        d, u = (r - r0) / (r1 - r0), ang / half
        fov = (d >= 0) & (d <= 1) & (np.abs(u) <= 1)
    else:        # linear probe: a rectangle
        half_w = rng.uniform(0.30, 0.37) * S
        d, u = (y - top) / (bottom - top), (x - S / 2) / half_w
        fov = (d >= 0) & (d <= 1) & (np.abs(u) <= 1)
    rows, cols = np.nonzero(fov.any(1))[0], np.nonzero(fov.any(0))[0]
    box = (rows[0], rows[-1] + 1, cols[0], cols[-1] + 1)
    return {"fov": fov, "d": d, "u": u, "box": box, "sector": sector}


@functools.lru_cache(maxsize=16)
def _grid(S: int) -> tuple:
    """Row and column index maps [S, S] (cached: every sample of a size shares them)."""
    y, x = np.mgrid[0:S, 0:S].astype(np.float32)
    return y, x


@functools.lru_cache(maxsize=16)
def _interp_weights(S: int, cells: int) -> tuple:
    """For S samples over a grid of cells + 1 knots: left knot index and right-knot weight."""
    pos = np.linspace(0, cells, S, dtype=np.float32)
    i0 = np.minimum(pos.astype(np.int64), cells - 1)
    return i0, (pos - i0)


def _smooth_noise(rng, S: int, cells: int) -> np.ndarray:
    """Low-frequency noise in [0, 1]: a coarse random grid, bilinearly up-sampled to S x S,
    rows then columns. Plain indexing, no BLAS: tiny matrix products spin BLAS threads, which
    is slow on a busy machine."""
    i0, f = _interp_weights(S, cells)
    c = rng.random((cells + 1, cells + 1), dtype=np.float32)
    rows = c[i0] * (1 - f)[:, None] + c[i0 + 1] * f[:, None]          # [S, cells + 1]
    return rows[:, i0] * (1 - f) + rows[:, i0 + 1] * f                  # [S, S]


# ----------------------------------------------------------------------------- tissue
def _organ_background(rng, organ: str, geo: dict, S: int) -> np.ndarray:
    """Reflectivity amplitude of the organ without lesions (1.0 = typical parenchyma)."""
    d, u = geo["d"], geo["u"]
    tex = 0.75 + 0.5 * _smooth_noise(rng, S, 8)
    wave = 0.03 * np.sin(3 * u + rng.uniform(0, 6))              # wavy layer boundaries
    amp = np.full((S, S), 1.0, np.float32) * tex
    if organ == "breast":   # skin, subcutaneous fat, fibroglandular tissue, pectoral muscle
        amp = np.where(d < 0.03, 2.2, np.where(d < 0.22 + wave, 0.55 * tex, amp))
        amp = np.where(d > 0.8 + wave, 0.7 * (1 + 0.4 * np.sin(60 * d)), amp)
    elif organ == "thyroid":  # strap muscles over homogeneous parenchyma, maybe the carotid
        amp = np.where(d < 0.14 + wave, 0.6, 1.1 * (0.9 + 0.2 * tex))
        if rng.random() < 0.5:
            cu = rng.choice([-0.75, 0.75])
            amp = np.where((u - cu) ** 2 / 0.02 + (d - 0.55) ** 2 / 0.012 < 1, 0.04, amp)
    elif organ == "lymph node":  # fat and muscle around the node
        amp = 0.7 * tex * (1 + 0.25 * np.sin(25 * d + 2 * u))
    else:  # liver: homogeneous, a few vessels, the bright diaphragm at depth
        for _ in range(rng.integers(1, 4)):
            cu, cd, rr = rng.uniform(-0.8, 0.8), rng.uniform(0.2, 0.8), rng.uniform(0.02, 0.05)
            amp = np.where((u - cu) ** 2 + ((d - cd) * 2) ** 2 < rr ** 2 * 4, 0.05, amp)
        amp = np.where(np.abs(d - 0.9 - wave) < 0.015, 2.5, amp)
    return amp.astype(np.float32)


def _lesion_shape(rng, malignant: bool, S: int) -> dict:
    """Semi-axes (pixels, a across, b along depth), tilt and a radial profile r(phi) in units of
    the ellipse radius: smooth for benign, lobulated and spiculated for malignant."""
    big = rng.uniform(0.07, 0.14) * S
    ratio = rng.uniform(1.25, 1.9)
    a, b = (big, big / ratio) if not malignant else (big / ratio, big)
    tilt = rng.uniform(-0.25, 0.25)
    phi = np.linspace(-np.pi, np.pi, 361, dtype=np.float32)
    prof = np.ones_like(phi)
    margin = "circumscribed"
    if malignant:
        margin = str(rng.choice(["spiculated", "angular", "microlobulated"]))
        for k in range(2, 7):          # irregular outline: random low harmonics
            prof += rng.uniform(0.03, 0.09) * np.cos(k * phi + rng.uniform(0, 2 * np.pi))
        n, width, length = {"spiculated": (rng.integers(6, 12), 0.05, 0.45),
                            "angular": (rng.integers(3, 6), 0.18, 0.25),
                            "microlobulated": (rng.integers(12, 20), 0.09, 0.08)}[margin]
        for c in rng.uniform(-np.pi, np.pi, n):
            dphi = np.angle(np.exp(1j * (phi - c)))
            prof += rng.uniform(0.5, 1.0) * length * np.exp(-(dphi / width) ** 2)
    else:
        prof += 0.02 * np.cos(2 * phi + rng.uniform(0, 6))    # an oval is never a perfect ellipse
    return {"a": a, "b": b, "tilt": tilt, "profile": prof, "margin": margin}


def _place_lesion(rng, shape: dict, geo: dict, S: int, avoid=None) -> np.ndarray:
    """Boolean lesion mask, centred inside the field of view at 18-62 % depth, fully inside
    it and (a few tries) off `avoid`. Evaluated only in a window around the centre."""
    ext = int(max(shape["a"], shape["b"]) * float(shape["profile"].max())) + 3
    inner = geo["fov"] & (geo["d"] > 0.18) & (geo["d"] < 0.62)
    ys, xs = np.nonzero(inner[::2, ::2])
    for _ in range(20):
        i = rng.integers(len(ys))
        cy, cx = int(ys[i]) * 2, int(xs[i]) * 2
        win = (slice(max(0, cy - ext), cy + ext + 1), slice(max(0, cx - ext), cx + ext + 1))
        mask = np.zeros((S, S), bool)
        mask[win] = _lesion_window(shape, *_grid(S), cy, cx, win)
        if (mask <= geo["fov"]).all() and (avoid is None or not (mask & avoid).any()):
            break
    return mask & geo["fov"]


def _lesion_window(shape: dict, y, x, cy: int, cx: int, win) -> np.ndarray:
    """Inside-test rho <= r(phi) in the lesion's rotated ellipse frame, on the window."""
    dy, dx = y[win] - cy, x[win] - cx
    c, s = np.cos(shape["tilt"]), np.sin(shape["tilt"])
    ex, ey = (c * dx + s * dy) / shape["a"], (-s * dx + c * dy) / shape["b"]   # ellipse frame
    rho, phi = np.hypot(ex, ey), np.arctan2(ey, ex)
    idx = np.round((phi + np.pi) / (2 * np.pi) * 360).astype(np.int64)      # profile sample
    return rho <= shape["profile"][idx]


def _lesion_reflectivity(rng, amp, mask, malignant: bool, organ: str, S: int) -> np.ndarray:
    """Hypoechoic interior: homogeneous for benign, patchy for malignant; a benign lymph node
    keeps its echogenic fatty hilum."""
    level = rng.uniform(0.10, 0.20)
    if malignant:
        inner = level * (0.25 + 1.5 * _smooth_noise(rng, S, 24))
    else:
        inner = np.full_like(amp, level)
        if organ == "lymph node":
            ys, xs = np.nonzero(mask)
            h = int(min(np.ptp(ys), np.ptp(xs)) * 0.3) + 1
            core = ndimage.binary_erosion(mask, iterations=h)
            inner = np.where(core, 1.2, inner)
    return np.where(mask, inner, amp).astype(np.float32)


def _posterior(amp, mask, geo: dict, enhance: bool) -> np.ndarray:
    """Posterior acoustic enhancement (benign) or shadowing (malignant): along each beam that
    crosses the lesion, scale the tissue below it."""
    bins = np.clip(((geo["u"] + 1) * 64).astype(np.int64), 0, 128)        # beam index per pixel
    bottom = np.full(129, np.inf, np.float32)
    np.minimum.at(bottom, bins[mask], -geo["d"][mask])                    # -(deepest lesion d)
    bottom = -bottom                                                       # -inf where no lesion
    hit = np.isfinite(bottom)
    strength = ndimage.gaussian_filter1d(hit.astype(np.float32), 1.5)
    bottom = np.where(hit, bottom, bottom[hit].max() if hit.any() else 1.0)
    below = np.clip((geo["d"] - bottom[bins]) / 0.02, 0, 1) * strength[bins]
    if enhance:
        gain = 1 + 0.8 * below * np.exp(-np.clip(geo["d"] - bottom[bins], 0, None) / 0.25)
    else:
        gain = 1 - 0.8 * below
    return amp * gain.astype(np.float32)


# ----------------------------------------------------------------------------- image formation
def _bmode(rng, amp, geo: dict, calcs, dr_db: float) -> np.ndarray:
    """Scatterers x reflectivity -> PSF blur -> envelope -> attenuation -> log compression."""
    S = amp.shape[0]
    z = rng.standard_normal((2, S, S), dtype=np.float32) * amp            # I and Q scatterers
    for y, x in calcs:                                                     # point reflectors
        z[:, y, x] += np.float32(rng.uniform(5, 9)) * np.float32([1, 0.5])
    sig = (S / 256 * 0.9, S / 256 * 1.8)                                   # axial, lateral (px)
    env = np.hypot(ndimage.gaussian_filter(z[0], sig, truncate=3),
                   ndimage.gaussian_filter(z[1], sig, truncate=3))
    env *= np.exp(-rng.uniform(0.4, 1.0) * np.clip(geo["d"], 0, 1))      # net of TGC
    ref = np.percentile(env[geo["fov"]], 99.5)
    db = 20 * np.log10(env / ref + 1e-6)
    img = np.clip((db + dr_db) / dr_db, 0, 1) * 255
    return np.where(geo["fov"], img, 0).astype(np.uint8)


def _font(S: int):
    try:  # Pillow >= 10.1 scales its built-in font; older versions have one bitmap size
        return ImageFont.load_default(size=max(8, S // 28))
    except TypeError:
        return ImageFont.load_default()


def _draw_overlays(rng, img, geo: dict, lesion, organ: str, depth_mm: float, calipers: bool):
    """Scanner-screen furniture: text, grey bar, logo, depth ruler and body marker outside the
    field of view; calipers across the lesion inside it."""
    S = img.shape[0]
    t, b, l, r = geo["box"]
    pil = Image.fromarray(img)
    draw, font = ImageDraw.Draw(pil), _font(S)
    draw.text((2, 1), f"{organ.upper()}  {rng.choice(['L12-5', 'C5-1', 'L18'])}  "
                      f"{rng.integers(5, 15)}MHz", fill=255, font=font)
    draw.text((S * 0.62, 1), f"G{rng.integers(30, 70)} DR{rng.integers(50, 80)}", fill=220, font=font)
    draw.text((2, S - S // 22 - 3), f"D {depth_mm / 10:.1f}cm  FR {rng.integers(15, 40)}", fill=200,
              font=font)
    bar = np.linspace(0, 255, max(1, b - t - 20)).astype(np.uint8)        # grey-scale bar, left
    pil.paste(Image.fromarray(np.repeat(bar[:, None], 5, 1)), (max(1, l - 10), t + 10))
    draw.rectangle((S - 14, S - 14, S - 3, S - 3), outline=180)           # body marker
    draw.line((S - 12, S - 6, S - 5, S - 6), fill=255)
    rx = min(S - 4, r + 4)                                                 # depth ruler, right
    draw.line((rx, t, rx, b), fill=230)
    mm = (b - t) / depth_mm
    for k in range(int(depth_mm // 10) + 1):
        draw.line((rx, t + k * 10 * mm, rx + 3, t + k * 10 * mm), fill=230)
    if calipers and lesion is not None:
        ys, xs = np.nonzero(lesion)
        row = int(ys.mean())
        cols = np.nonzero(lesion[row])[0]
        for cx in (cols[0], cols[-1]):
            draw.line((cx - 3, row, cx + 3, row), fill=255)
            draw.line((cx, row - 3, cx, row + 3), fill=255)
    return np.asarray(pil)


# ----------------------------------------------------------------------------- attributes
def _attributes(label: int, organ: str, shape, masks, geo, sector, mm_per_px, calcs) -> dict:
    base = {"organ": organ, "probe": "convex" if sector else "linear", "condition": CLASSES[label],
            "n_lesions": len(masks)}
    if label == 2:
        return {**base, "finding": "no focal lesion"}
    ys, xs = np.nonzero(masks[0])
    h, w = (np.ptp(ys) + 1) * mm_per_px, (np.ptp(xs) + 1) * mm_per_px
    malignant = label == 1
    attrs = {
        "shape": "irregular" if malignant else "oval",
        "margin": shape["margin"],
        "orientation": "not parallel" if malignant else "parallel",
        "echogenicity": "heterogeneous hypoechoic" if malignant else "homogeneous hypoechoic",
        "posterior_features": "posterior acoustic shadowing" if malignant else "posterior enhancement",
        "calcifications": "microcalcifications" if calcs else "none",
        "size_mm": round(float(max(h, w)), 1), "width_mm": round(float(w), 1),
        "height_mm": round(float(h), 1),
        "depth_mm": round(float(geo["d"][int(ys.mean()), int(xs.mean())]) * mm_per_px *
                          (geo["box"][1] - geo["box"][0]), 1),
    }
    if organ == "lymph node":
        attrs["hilum"] = "absent" if malignant else "echogenic fatty hilum"
    return {**base, **attrs}


def findings_sentence(attrs: dict) -> str:
    """One caption-ready sentence from the attributes ("normal" images say so)."""
    if attrs["condition"] == "normal":
        return f"Normal {attrs['organ']} tissue without a focal lesion."
    calc = ", microcalcifications" if attrs["calcifications"] != "none" else ""
    return (f"{attrs['shape'].capitalize()} {attrs['organ']} lesion, {attrs['size_mm']} mm, "
            f"{attrs['margin']} margins, {attrs['orientation']} orientation, "
            f"{attrs['echogenicity']} echotexture{calc}, {attrs['posterior_features']}.")


# ----------------------------------------------------------------------------- samples
def _draw_label(rng, cfg: PhantomConfig) -> int:
    if rng.random() < cfg.p_normal:
        return 2
    return int(rng.random() < cfg.p_malignant)


def _calcifications(rng, mask, malignant: bool) -> list:
    if not malignant:
        return []
    ys, xs = np.nonzero(ndimage.binary_erosion(mask, iterations=2))
    if len(ys) == 0:
        return []
    pick = rng.choice(len(ys), size=min(len(ys), int(rng.integers(3, 9))), replace=False)
    return list(zip(ys[pick], xs[pick]))


def make_sample(index: int, cfg: PhantomConfig = PhantomConfig()) -> dict:
    """One image: dict(image uint8 [S,S], mask bool [S,S] (union of lesions), masks (one per
    lesion), fov bool [S,S], label, label_name, organ, attributes, findings, index)."""
    rng = np.random.default_rng([cfg.seed, index])   # (seed, index): no overlap between seeds
    S = cfg.size
    label, organ = _draw_label(rng, cfg), str(rng.choice(cfg.organs))
    sector = bool(rng.random() < cfg.p_sector)
    geo = _field_of_view(rng, S, sector)
    depth_mm = float(rng.uniform(35, 60))
    amp = _organ_background(rng, organ, geo, S)
    masks, shape, calcs = [], None, []
    if label != 2:
        n = 2 if rng.random() < cfg.p_second_lesion else 1
        for k in range(n):
            shape_k = _lesion_shape(rng, label == 1, S if k == 0 else S // 2)
            masks.append(_place_lesion(rng, shape_k, geo, S, masks[0] if masks else None))
            amp = _lesion_reflectivity(rng, amp, masks[-1], label == 1, organ, S)
            amp = _posterior(amp, masks[-1], geo, enhance=label == 0)
            calcs += _calcifications(rng, masks[-1], label == 1)
            shape = shape or shape_k
    img = _bmode(rng, amp, geo, calcs, float(rng.uniform(*cfg.dynamic_range_db)))
    union = np.logical_or.reduce(masks) if masks else np.zeros((S, S), bool)
    img = _draw_overlays(rng, img, geo, masks[0] if masks else None, organ, depth_mm,
                         bool(rng.random() < cfg.p_calipers))
    mm_per_px = depth_mm / (geo["box"][1] - geo["box"][0])
    attrs = _attributes(label, organ, shape, masks, geo, sector, mm_per_px, calcs)
    return {"image": img, "mask": union, "masks": masks, "fov": geo["fov"], "label": label,
            "label_name": CLASSES[label], "organ": organ, "attributes": attrs,
            "findings": findings_sentence(attrs), "index": index}


def iter_samples(cfg: PhantomConfig = PhantomConfig()):
    """Yield make_sample(i, cfg) for i in range(cfg.n)."""
    for i in range(cfg.n):
        yield make_sample(i, cfg)


# ----------------------------------------------------------------------------- writing
def _save_png(array: np.ndarray, path: Path) -> None:
    Image.fromarray(array).save(path, compress_level=1)   # fast; PNG is lossless either way


def _write_sample(tmp: Path, sample: dict, number: int) -> dict:
    """Write one sample in BUSI naming; return its metadata.jsonl record."""
    cls = sample["label_name"]
    stem = f"{cls}/{cls} ({number})"
    _save_png(sample["image"], tmp / f"{stem}.png")
    mask_files = []
    for k, m in enumerate(sample["masks"] or [sample["mask"]]):   # normal: one empty mask
        name = f"{stem}_mask.png" if k == 0 else f"{stem}_mask_{k}.png"
        _save_png(m.astype(np.uint8) * 255, tmp / name)
        mask_files.append(name)
    return {"file": f"{stem}.png", "masks": mask_files, "label": sample["label"],
            "label_name": cls, "organ": sample["organ"], "attributes": sample["attributes"],
            "findings": sample["findings"], "index": sample["index"]}


def write_dataset(root, cfg: PhantomConfig = PhantomConfig()) -> Path:
    """Write cfg.n images in the BUSI layout plus metadata.jsonl under `root`, atomically: into
    a temporary sibling folder, renamed into place at the end. If another process finished the
    same folder first, its copy is kept."""
    root = Path(root)
    if root.exists() and any(root.iterdir()):
        raise FileExistsError(f"{root} exists and is not empty: pass a new folder for the phantom")
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.tmp-", dir=root.parent))
    try:
        _write_all(tmp, cfg)
        os.replace(tmp, root)       # an empty `root` is replaced; a full one raises OSError
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (root / "metadata.jsonl").exists():   # not a concurrent writer's finished copy
            raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return root


def _write_all(tmp: Path, cfg: PhantomConfig) -> None:
    counts = {c: 0 for c in CLASSES}
    records = []
    for sample in iter_samples(cfg):
        cls = sample["label_name"]
        (tmp / cls).mkdir(exist_ok=True)
        counts[cls] += 1
        records.append(_write_sample(tmp, sample, counts[cls]))
    with open(tmp / "metadata.jsonl", "w") as f:
        for rec in records:
            f.write(json.dumps(rec) + "\n")
    with open(tmp / "phantom_config.json", "w") as f:
        json.dump({k: list(v) if isinstance(v, tuple) else v for k, v in vars(cfg).items()}, f)
