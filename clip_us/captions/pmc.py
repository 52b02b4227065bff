"""PMC-OA's ultrasound subset: `python -m clip_us.captions pmc-ultrasound`.

The ultrasound-CLIP paper (§4.1) extracts the ultrasound images and their captions from PMC-OA's
1.85 M image-caption pairs and drops low-resolution images; it publishes no code or rule for it.
This is a documented rule of our own:

1. the caption names ultrasound: one of TERMS, matched case-insensitively on word boundaries
   ("ultrasound-guided" and "Sonographic" match; "thrust" and "museum" do not);
2. and names no other imaging modality or microscopy, nor a non-imaging use of ultrasound
   (EXCLUDED). PMC-OA's captions are per subfigure; one that names CT or histology beside
   ultrasound mostly describes that panel or a composite, and "laser Doppler" or "ultrasound
   treatment" of cells is no image at all. `keep_mixed` (--keep-mixed) skips this step;
3. the image exists, decodes (the whole file is read), and its shorter side is at least `min_side`
   pixels (224 by default: CLIP ViT-B/16's input side, so no kept image is upsampled to train).

Input: PMC-OA's JSONL (pmc_oa.jsonl, or its train/valid/test.jsonl), one object per line with
`image` (a file name in the images folder) and `caption`; any other keys (pmcid, url_name) are
kept as columns. Output: a manifest (manifest.write_manifest) that `train_contrastive.py
--manifest` reads, with `image`, `caption`, `dataset` (pmc-oa), the first `term` matched and the
other keys; beside it `<out stem>.selection.json` with the rule and the counts: rows read, kept, and
dropped by reason (no_term, excluded, missing_image, unreadable, too_small).

    python -m clip_us.captions pmc-ultrasound data/pmc_oa/pmc_oa.jsonl \\
        --images data/pmc_oa/caption_T060_filtered_top4_sep_v0_subfigures --out pmc_us.csv
"""
from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

from PIL import Image

from ..fileio import write_json
from .manifest import ManifestError, jsonl_objects, write_manifest

# (shown in --help, pattern); each pattern is matched as a whole word, in any case.
TERMS = (
    ("ultrasound", r"ultrasounds?"),
    ("ultrasonograph*", r"ultrasonograph\w*"),
    ("ultrasonogram", r"ultrasonograms?"),
    ("sonograph*", r"sonograph\w*"),
    ("sonogram", r"sonograms?"),
    ("echograph*", r"echograph\w*"),
    ("echocardiogra*", r"echocardiogra\w*"),
    ("endosonograph*", r"endosonograph\w*"),
    ("doppler", r"doppler"),
    ("B-mode", r"b-mode"),
    ("US image/scan", r"us\s+(?:images?|scans?)"),
    ("EUS/TRUS/CEUS/POCUS/TVUS", r"(?:eus|trus|ceus|pocus|tvus)"),
    ("hypo/hyper/an/isoechoic", r"(?:hypo|hyper|an|iso)echoic"),
    ("echogenic*", r"echogenic\w*"),
)
EXCLUDED = (
    ("CT/computed tomograph*", r"ct|computed\s+tomograph\w*"),
    ("MRI/MR image/magnetic resonance", r"mri|mr\s+images?|magnetic\s+resonance"),
    ("X-ray/radiograph*/fluoroscop*/mammogra*/angiogra*",
     r"x-rays?|radiograph\w*|fluoroscop\w*|mammogra\w*|angiogra\w*"),
    ("PET/SPECT/scintigra*", r"pet|spect|scintigra\w*"),
    ("OCT/optical coherence", r"oct|optical\s+coherence"),
    ("microscop*/micrograph/H&E/hematoxylin/immunohistochem*/stained/staining",
     r"microscop\w*|micrographs?|h&e|hematoxylin|immunohistochem\w*|stain(?:ed|ing)"),
    ("laser Doppler/ultrasound (or ultrasonic) bath/treatment/irradiation/stimulation/exposure",
     r"laser\s+doppler|(?:ultrasound|ultrasonic)\s+(?:bath|treatment|irradiation|stimulation|"
     r"exposure)"),
)
MIN_SIDE = 224
REASONS = ("no_term", "excluded", "missing_image", "unreadable", "too_small")


def _compile(table) -> list:
    return [(name, re.compile(rf"\b(?:{pattern})\b", re.I)) for name, pattern in table]


_TERMS, _EXCLUDED = _compile(TERMS), _compile(EXCLUDED)


def first_match(text: str, compiled: list) -> str | None:
    """The display name of the first entry of `compiled` found in `text`, or None."""
    return next((name for name, rx in compiled if rx.search(text)), None)


def rule_text() -> str:
    """The rule's terms and exclusions in one line, for --help."""
    return (f"kept when its caption names one of {', '.join(n for n, _ in TERMS)}; and none of "
            f"{'; '.join(n for n, _ in EXCLUDED)} (whole words, any case; --keep-mixed skips "
            f"this); and its image decodes with a shorter side of at least --min-side pixels")


def image_side(path: Path) -> int | None:
    """The shorter side of a decodable image, or None when it cannot be decoded."""
    try:
        with Image.open(path) as im:
            im.load()
            return min(im.size)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):
        return None


def read_jsonl(path: Path):
    """(line number, object) per non-empty line of PMC-OA's JSONL, read as a stream (the full
    file has 1.85 M lines); every object needs an `image`."""
    with open(path, encoding="utf-8-sig") as f:
        for n, obj in jsonl_objects(path, f):
            if "image" not in obj:
                raise ManifestError(f"{path}:{n}: no `image` key; PMC-OA's JSONL has one "
                                    f'{{"image": ..., "caption": ...}} object per line')
            yield n, obj


def find_image(images: Path, name: str) -> Path | None:
    """The file `name` names under the images folder (as written, else by its file name)."""
    for candidate in (images / name, images / Path(name).name):
        if candidate.is_file():
            return candidate
    return None


def caption_verdict(caption: str, keep_mixed: bool) -> tuple[str | None, str | None]:
    """(reason dropped or None, the term or exclusion that decided) for one caption."""
    term = first_match(caption, _TERMS)
    if term is None:
        return "no_term", None
    excluded = None if keep_mixed else first_match(caption, _EXCLUDED)
    return ("excluded", excluded) if excluded else (None, term)


def image_verdict(images: Path, name: str, min_side: int) -> tuple[str | None, Path | None]:
    """(reason dropped or None, the image's path) for one row's image."""
    path = find_image(images, name)
    if path is None:
        return "missing_image", None
    side = image_side(path)
    if side is None:
        return "unreadable", path
    return ("too_small", path) if side < min_side else (None, path)


def select_row(obj: dict, images: Path, min_side: int, keep_mixed: bool) -> tuple[str, dict]:
    """(reason, manifest row) of one JSONL object; reason "kept" or one of REASONS (the caption
    is judged first: it costs no file access)."""
    caption = " ".join(str(obj.get("caption") or "").split())
    reason, decided = caption_verdict(caption, keep_mixed)
    if reason is not None:
        return reason, {"term": decided}
    reason, path = image_verdict(images, str(obj["image"]), min_side)
    if reason is not None:
        return reason, {}
    extra = {k: v for k, v in obj.items() if k not in ("image", "caption")}
    return "kept", {"image": str(path.resolve()), "caption": caption, "dataset": "pmc-oa",
                    "term": decided, **extra}


def selection_path(out) -> Path:
    """The counts' JSON beside the manifest: pmc_us.csv -> pmc_us.selection.json."""
    out = Path(out)
    return out.with_name(out.stem + ".selection.json")


def select_ultrasound(jsonl, out, images=None, min_side: int = MIN_SIDE,
                      keep_mixed: bool = False) -> dict:
    """Write the manifest of PMC-OA's ultrasound rows (see the module docstring) and its counts
    (selection_path(out)); returns the counts."""
    jsonl = Path(jsonl)
    images = Path(images) if images else jsonl.parent / "images"
    if not images.is_dir():
        raise ManifestError(f"{images}: no such folder; pass --images, the folder PMC-OA's "
                            f"images.zip unpacks to")
    if min_side < 1:
        raise ManifestError(f"--min-side must be at least 1 pixel, got {min_side}")
    reasons, by_term, excluded_by, kept = Counter(), Counter(), Counter(), []
    for _, obj in read_jsonl(jsonl):
        reason, row = select_row(obj, images, min_side, keep_mixed)
        reasons[reason] += 1
        if reason == "kept":
            kept.append(row)
            by_term[row["term"]] += 1
        elif reason == "excluded":
            excluded_by[row["term"]] += 1
    if not kept:
        raise ManifestError(f"{jsonl}: no row kept ({dict(reasons)}); nothing to write")
    write_manifest(out, kept)
    summary = {"jsonl": str(jsonl), "images": str(images), "out": str(out),
               "rule": {"terms": [n for n, _ in TERMS], "excluded": [n for n, _ in EXCLUDED],
                        "keep_mixed": keep_mixed, "min_side": min_side},
               "rows": sum(reasons.values()), "kept": reasons["kept"],
               "dropped": {r: reasons[r] for r in REASONS},
               "kept_by_term": dict(by_term.most_common()),
               "excluded_by": dict(excluded_by.most_common())}
    write_json(selection_path(out), summary)
    return summary
