"""Training captions for image-text alignment: three tiers of templates, fitting to CLIP's 77
tokens, and rewriting with a language model through any OpenAI-compatible server.

- Templates follow EchoCare-CLIP, which fills part of its captions from three tiers:
  1. organ only; 2. organ and condition; 3. patient, region, findings (shape, margin,
  echogenicity, posterior features) and condition, each with a fallback wording when missing.
  Tiers are drawn 20/30/50 %, as the authors' template documentation says. The wording here is
  our own, ten templates per tier. Every choice comes from a generator seeded by (seed, row,
  image), so a manifest can be regenerated exactly (the authors seeded BUSI's choice with
  Python's salted `hash()`, which changes on every run).
- `fit_to_context` shortens a caption to CLIP's 77 tokens (start and end tokens included,
  counted with our tokenizer) at a sentence boundary, else a clause boundary, else a word
  boundary; it never cuts inside a word, a CJK character or an emoji.
- `refine_manifest` rewrites captions with an LLM: `translate` does what the ultrasound-CLIP paper
  (§4.1) did with Qwen3-8B on the Chinese CURD captions (English, one clinical sentence within 77 tokens);
  `echocare` is EchoCare-CLIP's own procedure with Qwen3-4B-Instruct, its prompts copied
  (echocare.py); `describe` is our wording of it (three 15-60-word captions from a row's
  metadata, one picked per row with the seed). The HTTP client, retries and cache are llm.py.

    python -m clip_us.captions template data/BUSI --out data/BUSI/captions.csv
    python -m clip_us.captions fit captions.csv --out captions77.csv
    python -m clip_us.captions refine curd.csv --mode translate \\
        --endpoint http://127.0.0.1:8000/v1 --model Qwen/Qwen3-8B --out curd_en.csv

Manifests are CSV (or JSONL when the name ends in .jsonl or .json): `image` (relative to the
manifest), `caption`, then `organ`, `label`, `dataset`, `tier` and attribute columns. manifest.py
reads and writes them for every command here and for `train_contrastive.py`; `phantom_manifest`
writes the phantom's, the manifest train_contrastive.py and evaluate.py read by default.
"""
from __future__ import annotations

import os
import random
import re
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import regex

from .. import data
from ..fileio import cache_dir
from ..labels import CLASSES, parse_label
from ..phantom import ORGANS, PhantomConfig, write_dataset
from ..tokenizer import default_tokenizer
from . import echocare, llm
from .manifest import (
    CAPTION_COLS,
    IMAGE_COLS,
    ManifestError,
    is_mostly_non_ascii,
    pick_column,
    read_rows,
    write_rows,
)

TIER_WEIGHTS = (0.2, 0.3, 0.5)
CONTEXT_LENGTH = 77


# The package's one error: a manifest, metadata file or caption setting is unusable, and the
# message says what to do (the manifest reader raises it too, as manifest.ManifestError).
CaptionError = ManifestError


# ----------------------------------------------------------------------------- templates
# Every caption is longer than 20 characters even for a three-letter organ: the official
# fine-tuning code (and train_contrastive.py) drops captions of 20 characters or fewer.
TIER1 = (   # organ only
    "An ultrasound image of the {organ}.",
    "A B-mode ultrasound scan of the {organ}.",
    "A sonogram of the {organ}.",
    "Grayscale ultrasound of {organ} tissue.",
    "An ultrasound view of the {organ}.",
    "{organ} ultrasound image, B-mode.",
    "Diagnostic ultrasound of the {organ}.",
    "A sonographic image showing the {organ}.",
    "Ultrasound examination of the {organ}.",
    "An echographic image of the {organ} region.",
)
TIER2 = (   # organ and condition; every wording reads for benign, malignant and normal
    "{organ} ultrasound showing {condition} findings.",
    "A B-mode scan of the {organ}, read as {condition}.",
    "Sonographic image of the {organ}; the finding is {condition}.",
    "Ultrasound of the {organ} classified as {condition}.",
    "A {condition} case on {organ} ultrasound.",
    "Grayscale sonogram of the {organ} with a {condition} appearance.",
    "An ultrasound view of the {organ}, diagnosis: {condition}.",
    "An ultrasound scan of the {organ}: {condition}.",
    "Ultrasound examination of the {organ} with {condition} features.",
    "Echographic image of the {organ} showing a {condition} pattern.",
)
TIER3 = (   # patient, region, findings and condition (as a diagnosis phrase)
    "Ultrasound of {region} in {patient} shows {findings}, {diagnosis}.",
    "B-mode image of {region} from {patient}: {findings}, {diagnosis}.",
    "{patient} underwent ultrasound of {region}, which shows {findings}, {diagnosis}.",
    "Sonography of {region} ({patient}) reveals {findings}, {diagnosis}.",
    "In {patient}, ultrasound of {region} demonstrates {findings}, {diagnosis}.",
    "Findings in {region} of {patient}: {findings}, {diagnosis}.",
    "Grayscale ultrasound, {region}, {patient}: {findings}, {diagnosis}.",
    "A scan of {region} in {patient} depicts {findings}, {diagnosis}.",
    "{patient}; ultrasound of {region}: {findings}, {diagnosis}.",
    "Echographic study of {region} for {patient} showing {findings}, {diagnosis}.",
)
TEMPLATES = {1: TIER1, 2: TIER2, 3: TIER3}

# Record columns each field is read from (case-insensitive; the first non-empty one wins).
ALIASES = {
    "organ": ("organ", "tissue", "body_part"),
    "condition": ("condition", "label", "label_name", "diagnosis", "class"),
    "age": ("age", "patient_age"),
    "sex": ("sex", "gender", "patient_sex"),
    "region": ("region", "location", "site", "position"),
    "shape": ("shape",),
    "margin": ("margin", "margins"),
    "echogenicity": ("echogenicity", "echo_pattern", "echotexture"),
    "posterior": ("posterior", "posterior_features", "posterior_acoustic_features"),
    "orientation": ("orientation",),
    "calcifications": ("calcifications", "calcification"),
    "size_mm": ("size_mm", "size"),
    "finding": ("finding", "findings"),
}
FIELDS = ("organ", "condition", "age", "sex", "region", "shape", "margin", "echogenicity",
          "posterior")          # the fields the tiers name; each has a fallback wording
TIER3_FIELDS = ("age", "sex", "region", "shape", "margin", "echogenicity", "posterior", "finding")
FINDING_FIELDS = ("shape", "margin", "echogenicity", "posterior")
MISSING = {"", "nan", "none", "n/a", "na", "unknown", "null", "-"}
FALLBACK = {
    "organ": "tissue",
    "condition": "unspecified",
    "patient": "a patient",                      # neither age nor sex
    "region": "the {organ}",                     # the organ stands in for the region
    "shape": "a lesion",                         # no shape adjective
    "margin": "margins not described",
    "echogenicity": "echogenicity not described",
    "posterior": "posterior features not described",
    "findings": "findings not described",        # no finding field at all
    "diagnosis": "with no recorded diagnosis",
}
DIAGNOSIS = {"benign": "consistent with a benign lesion", "malignant": "suspicious for malignancy",
             "normal": "with no abnormality"}


def _present(value) -> str | None:
    text = "" if value is None else " ".join(str(value).split())
    return None if text.lower() in MISSING else text


def record_fields(rec: dict) -> dict:
    """The template fields of a record (a manifest row, metadata entry, ...): {field: text},
    present fields only. Class labels (names or indices) become class names."""
    lower = {str(k).strip().lower().replace(" ", "_"): v for k, v in rec.items()}
    out = {}
    for name, keys in ALIASES.items():
        value = next((v for v in (_present(lower.get(k)) for k in keys) if v), None)
        if value is not None:
            out[name] = value
    if "condition" in out:
        label = parse_label(out["condition"])
        out["condition"] = CLASSES[label] if label is not None else out["condition"].lower()
    return out


def _article(phrase: str) -> str:
    """'a' or 'an' for the phrase (by sound for numbers: an 8-, an 11-, an 18-year-old)."""
    first = phrase.split("-")[0].split(" ")[0]
    if first[:1].isdigit():
        vowel = first.startswith("8") or first in ("11", "18")
    else:
        vowel = first[:1].lower() in "aeiou"
    return f"{'an' if vowel else 'a'} {phrase}"


def patient_phrase(f: dict) -> str:
    """'a 52-year-old woman', 'a female patient', 'an 18-year-old patient', or the fallback."""
    sex = (f.get("sex") or "").lower()
    noun = {"f": "woman", "female": "woman", "woman": "woman",
            "m": "man", "male": "man", "man": "man"}.get(sex)
    age = re.match(r"\d+", f.get("age") or "")
    if age:
        return _article(f"{age.group()}-year-old {noun or 'patient'}")
    if noun:
        return f"a {'female' if noun == 'woman' else 'male'} patient"
    return FALLBACK["patient"]


def region_phrase(f: dict, organ: str) -> str:
    """'the left breast', 'the right lobe of the thyroid', or the organ as fallback."""
    region = f.get("region")
    if region is None:
        return FALLBACK["region"].format(organ=organ)
    region = re.sub(r"^the\s+", "", region, flags=re.I)
    if region.lower() in ("left", "right", "bilateral"):
        return f"the {region.lower()} {organ}"
    if organ.lower() in region.lower() or organ == FALLBACK["organ"]:
        return f"the {region}"
    return f"the {region} of the {organ}"


def _with_word(value: str, word: str, prefix: bool = False) -> str:
    """'circumscribed' -> 'circumscribed margins'; a value naming the word already is kept."""
    if word.rstrip("s") in value.lower():
        return value
    return f"{word} {value}" if prefix else f"{value} {word}"


def findings_phrase(f: dict) -> str:
    """'an irregular 14.2 mm lesion with spiculated margins, ... and posterior acoustic
    shadowing'; each missing finding field gets its fallback wording."""
    if not any(k in f for k in FINDING_FIELDS):
        if f.get("finding"):
            return f["finding"]
        return "no focal lesion" if f.get("condition") == "normal" else FALLBACK["findings"]
    size = f"{f['size_mm']} mm " if f.get("size_mm") and f["size_mm"][:1].isdigit() else ""
    lesion = _article(f"{f['shape']} {size}lesion") if "shape" in f else \
        (_article(f"{size}lesion") if size else FALLBACK["shape"])
    parts = [_with_word(f["margin"], "margins") if "margin" in f else FALLBACK["margin"],
             _with_word(f["echogenicity"], "echotexture") if "echogenicity" in f
             else FALLBACK["echogenicity"],
             _with_word(f["posterior"], "posterior", prefix=True) if "posterior" in f
             else FALLBACK["posterior"]]
    parts += [_with_word(f[k], w) for k, w in (("orientation", "orientation"),
                                                ("calcifications", "calcifications")) if k in f]
    return f"{lesion} with {', '.join(parts[:-1])} and {parts[-1]}"


def diagnosis_phrase(f: dict) -> str:
    condition = f.get("condition")
    if condition is None:
        return FALLBACK["diagnosis"]
    return DIAGNOSIS.get(condition, f"labelled {condition}")


def slots(f: dict) -> dict:
    """Every placeholder a template may use, filled from the fields or their fallbacks."""
    organ = f.get("organ", FALLBACK["organ"])
    return {"organ": organ, "condition": f.get("condition", FALLBACK["condition"]),
            "patient": patient_phrase(f), "region": region_phrase(f, organ),
            "findings": findings_phrase(f), "diagnosis": diagnosis_phrase(f)}


def render(template: str, fields: dict) -> str:
    """One caption: the template filled from `fields` (record_fields' output), first letter
    capitalised."""
    text = " ".join(template.format(**slots(fields)).split())
    return text[:1].upper() + text[1:]


def usable_tier(tier: int, fields: dict) -> int:
    """The drawn tier, or the highest lower one the record supports: tier 3 needs one of its
    own fields (patient, region or a finding), tier 2 a condition. Without them the caption
    would be all fallbacks, or claim a condition nobody recorded."""
    if tier == 3 and not any(k in fields for k in TIER3_FIELDS):
        tier = 2
    if tier == 2 and "condition" not in fields:
        tier = 1
    return tier


def parse_tier_weights(spec) -> tuple:
    """'20,30,50' or (0.2, 0.3, 0.5) -> three weights summing to 1."""
    try:
        w = [float(x) for x in (spec.split(",") if isinstance(spec, str) else spec)]
    except ValueError:
        w = []
    if len(w) != 3 or min(w) < 0 or sum(w) <= 0:
        raise CaptionError(f"tier weights must be three non-negative numbers for tiers 1,2,3, "
                           f"e.g. 20,30,50; got {spec!r}")
    return tuple(x / sum(w) for x in w)


def row_rng(seed: int, index: int, image: str = "") -> random.Random:
    """A generator for one row from (seed, row, image); str seeds are hashed with SHA-512, so
    the same row gets the same draws in every Python process (unlike salted `hash()`)."""
    return random.Random(f"{seed}|{index}|{image}")


def template_caption(rec: dict, rng: random.Random, weights=TIER_WEIGHTS,
                     context_length: int = CONTEXT_LENGTH) -> tuple[str, int]:
    """(caption, tier used) for one record: a tier drawn with `weights`, lowered when the
    record lacks its fields, then one of that tier's templates, fitted to the context."""
    fields = record_fields(rec)
    tier = usable_tier(rng.choices((1, 2, 3), weights=weights)[0], fields)
    caption = render(rng.choice(TEMPLATES[tier]), fields)
    return fit_to_context(caption, context_length), tier


# ----------------------------------------------------------------------------- fitting
# Scripts written without spaces between words: each character (or emoji) is its own word.
STANDALONE = regex.compile(r"[\p{Han}\p{Hiragana}\p{Katakana}\p{Thai}\p{Lao}\p{Khmer}"
                           r"\p{Myanmar}\p{Extended_Pictographic}\p{Regional_Indicator}]")
# A whole grapheme cluster that starts with such a character (the search runs in C).
STANDALONE_CLUSTER = regex.compile(r"(?=" + STANDALONE.pattern + r")\X")
SENTENCE_END = regex.compile(r"[.!?…]+[\"'”’)\]]*(?=\s)|[。！？]+[”’」』）]*")
CLAUSE_MARK = regex.compile(r"[,;:]+(?=\s)|[，；：、]|\s[-–—](?=\s)")
TRAILING = " \t\r\n,;:，；：、-–—"


def token_count(text: str, tokenizer=None) -> int:
    """CLIP tokens of `text` with the start and end tokens, as the text tower sees it."""
    return len((tokenizer or default_tokenizer()).encode(text)) + 2


def sentence_cuts(text: str) -> list:
    return [m.end() for m in SENTENCE_END.finditer(text)]


def clause_cuts(text: str) -> list:
    return [m.start() for m in CLAUSE_MARK.finditer(text)]


def word_cuts(text: str) -> list:
    """Word ends: before whitespace, and around every grapheme cluster of a CJK/Thai character
    or emoji (a whole cluster: 👍🏽 and ZWJ families stay together)."""
    cuts = [m.start() for m in regex.finditer(r"\s+", text)]
    for m in STANDALONE_CLUSTER.finditer(text):
        cuts += [m.start(), m.end()]
    return cuts


def grapheme_cuts(text: str) -> list:
    """Every grapheme cluster boundary: only for a single word longer than the context."""
    return [m.end() for m in regex.finditer(r"\X", text)]


def _longest_fitting(text: str, cuts, context_length: int, tokenizer) -> str | None:
    """The longest prefix text[:cut] (trailing separators stripped) that fits, by bisection
    over the cuts: a longer prefix has at least as many tokens, so about log2(len(cuts))
    encodes find it. Only prefixes that were measured to fit are returned."""
    cuts, best = sorted(set(cuts)), None
    lo, hi = 0, len(cuts)             # cuts[:lo] fit (as far as measured), cuts[hi:] do not
    while lo < hi:
        mid = (lo + hi) // 2
        candidate = text[:cuts[mid]].rstrip(TRAILING)
        if token_count(candidate, tokenizer) <= context_length:
            best, lo = (candidate or best), mid + 1
        else:
            hi = mid
    return best


def fit_to_context(caption: str, context_length: int = CONTEXT_LENGTH, tokenizer=None) -> str:
    """`caption` shortened to fit `context_length` CLIP tokens (start and end included): whole
    sentences if the first fits, else whole clauses, else whole words. Unchanged if it fits."""
    if context_length < 3:
        raise CaptionError(f"the context length must be at least 3 (start, end and one token; "
                           f"--context-length), got {context_length}")
    tokenizer = tokenizer or default_tokenizer()
    if token_count(caption, tokenizer) <= context_length:
        return caption
    text = caption.strip()
    for cuts in (sentence_cuts, clause_cuts, word_cuts, grapheme_cuts):
        best = _longest_fitting(text, cuts(text), context_length, tokenizer)
        if best:
            return best
    raise CaptionError(f"cannot fit {caption[:40]!r} into {context_length} tokens: its first "
                       f"character alone is longer; raise --context-length")


# ----------------------------------------------------------------------------- manifest paths
def rebase(value: str, src: Path, dst: Path, must_exist: bool = True) -> str:
    """A manifest path relative to folder `src`, made relative to folder `dst` (paths in a
    manifest are relative to the manifest). Absolute paths and URLs are kept, and with
    `must_exist` so are paths not found under `src` (a metadata CSV may name them otherwise)."""
    if not value or os.path.isabs(value) or "://" in value or src.resolve() == dst.resolve():
        return value
    full = src / value
    if must_exist and not full.exists():
        return value
    return Path(os.path.relpath(full.resolve(), dst.resolve())).as_posix()


def image_column(columns: list) -> str | None:
    """The image column among `columns` (IMAGE_COLS, any case), or None."""
    lower = {c.lower(): c for c in columns}
    return next((lower[c] for c in IMAGE_COLS if c in lower), None)


def rebase_images(columns: list, rows: list, src, out) -> None:
    """Point the image column of rows read from manifest `src` at the same files from `out`'s
    folder (in place): a manifest's paths are relative to it, so a copy written elsewhere
    moves them. The images need not be on this machine (refine may run beside the LLM)."""
    icol = image_column(columns)
    for row in rows if icol else ():
        row[icol] = rebase(row.get(icol) or "", Path(src).parent, Path(out).parent, False)


# ----------------------------------------------------------------------------- template sources
ORGAN_HINTS = (("busi", "breast"), ("breast", "breast"), ("tn3k", "thyroid"),
               ("tg3k", "thyroid"), ("ddti", "thyroid"), ("thyroid", "thyroid"),
               ("prostate", "prostate"), ("liver", "liver"), ("lung", "lung"),
               ("kidney", "kidney"), ("lymph", "lymph node"), ("carotid", "carotid artery"))


def guess_organ(*names) -> str | None:
    """The organ a data set's name gives away (BUSI -> breast, TN3K -> thyroid, ...)."""
    for name in names:
        low = (name or "").lower()
        hit = next((organ for key, organ in ORGAN_HINTS if key in low), None)
        if hit:
            return hit
    return None


def detect_layout(root: Path) -> str:
    """clip_us.data's layout name for a data set folder."""
    if any((root / c).is_dir() for c in ("benign", "malignant")):
        return "busi"
    if (root / "all" / "images").is_dir():
        return "nextgen"
    if (root / "trainval-image").is_dir():
        return "tn3k"
    if (root / "images").is_dir() or (root / "image").is_dir():
        return "folder"
    raise CaptionError(f"{root}: cannot tell the data set layout (no benign/, all/images/, "
                       f"trainval-image/ or images/ inside); pass --dataset")


def read_metadata(root: Path) -> dict:
    """{image key: flat attributes} from a metadata.jsonl beside the images (the phantom's)."""
    path = root / "metadata.jsonl"
    if not path.is_file():
        return {}
    out = {}
    for rec in read_rows(path)[1]:
        if "file" not in rec:
            raise CaptionError(f"{path}: a line without \"file\"; rewrite the phantom "
                               f"(python -m clip_us.phantom) or remove the file")
        attrs = {k: v for k, v in rec.get("attributes", {}).items() if k != "condition"}
        out[rec["file"]] = {"organ": rec.get("organ", ""), **attrs}
    return out


def _natural(key: str) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", key)]


def scan_labelled(root: Path, layout: str, nextgen_name: str | None, skip_bad: bool) -> list:
    """clip_us.data's Items (key, image, label) of a labelled data set folder, in natural order.
    The layout's own scanner lists them; no split is made (a caption manifest of a handful of
    images is fine) and no image is decoded."""
    if layout in ("folder", "ddti", "tn3k") and not (root / "labels.csv").is_file():
        raise CaptionError(f"{root}: no labels.csv (columns image,label), so no condition to "
                           f"caption; add one, or pass a CSV with an image column and any "
                           f"metadata columns instead of the folder")
    cfg = data.DataConfig(dataset=layout, root=str(root), task="cls", keep_normal=True,
                          skip_bad=skip_bad, nextgen_name=nextgen_name)
    tally = data.Tally(skip_bad)
    items = data.SCANNERS[layout](root, cfg, tally)[0]
    if tally.messages:
        warnings.warn(f"skipped {len(tally.messages)} bad file(s), e.g. {tally.messages[0]}")
    return sorted(items, key=lambda it: _natural(it.key))


def folder_records(root, out_dir: Path, layout: str | None = None, organ: str | None = None,
                   nextgen_name: str | None = None, skip_bad: bool = False) -> tuple[list, list]:
    """(records, keys): a record (image relative to out_dir, organ, label, attributes) and the
    image's path inside the data set for every image of a labelled data set in any layout the
    supervised scripts read, listed by clip_us.data itself."""
    root = Path(root)
    layout = layout or detect_layout(root)
    items, meta = scan_labelled(root, layout, nextgen_name, skip_bad), read_metadata(root)
    guess = guess_organ(nextgen_name, root.name, layout)
    if organ is None and guess is None and not meta:
        raise CaptionError(f"{root}: cannot tell the organ from the data set's name; "
                           f"pass --organ (e.g. --organ breast)")
    records = []
    for it in items:   # --organ, else the metadata's organ, else the name's
        attrs = meta.get(it.key, {})
        records.append({"image": Path(os.path.relpath(it.image, out_dir)).as_posix(), **attrs,
                        "organ": organ or attrs.get("organ") or guess or "",
                        "label": CLASSES[it.label]})
    return records, [it.key for it in items]


def csv_records(path, out_dir: Path, image_col: str | None = None,
                organ: str | None = None) -> tuple[list, list, list]:
    """(columns, records, keys) of a CSV/JSONL of metadata columns, one image per row: image
    paths are rebased onto out_dir (keys keep them as written) and any existing caption is
    kept as `original_caption`."""
    path = Path(path)
    columns, rows, _ = read_rows(path)
    icol = pick_column(path, columns, image_col, IMAGE_COLS, "image")
    if organ is None and "organ" not in record_fields(dict.fromkeys(columns, "x")):
        raise CaptionError(f"{path}: no organ column; pass --organ (e.g. --organ thyroid)")
    records = []
    for row in rows:
        rec = {k: v for k, v in row.items() if k != icol}
        if "caption" in rec:
            rec["original_caption"] = rec.pop("caption")
        # --organ is the organ of every row, as for a folder: it overrides an organ column
        records.append({"image": rebase(row[icol], path.parent, out_dir), **rec,
                        **({"organ": organ} if organ else {})})
    rest = [c for c in columns if c not in (icol, "caption")]
    extra = ["organ"] * (organ is not None and "organ" not in rest) + rest
    return extra, records, [row[icol] for row in rows]


def add_captions(records: list, keys: list, seed: int = 0, tier_weights=TIER_WEIGHTS,
                 context_length: int = CONTEXT_LENGTH) -> dict:
    """Fill `caption` and `tier` in every record (in place), drawing from (seed, row, key):
    the same data set gives the same captions wherever the manifest is written. Returns the
    number of rows per tier."""
    weights = parse_tier_weights(tier_weights)
    counts = {1: 0, 2: 0, 3: 0}
    for i, (rec, key) in enumerate(zip(records, keys)):
        rec["caption"], rec["tier"] = template_caption(rec, row_rng(seed, i, key), weights,
                                                       context_length)
        counts[rec["tier"]] += 1
    return counts


MANIFEST_COLUMNS = ("image", "caption", "organ", "label", "dataset", "tier")


def check_source_flags(data: Path, dataset, image_col, nextgen_name, skip_bad) -> None:
    """Refuse the flags that do nothing for this kind of source (a folder or a CSV), rather
    than ignore them."""
    if data.is_dir():
        wrong = ["--image-col"] * bool(image_col)
        if nextgen_name and (dataset or detect_layout(data)) not in ("nextgen", "prostate"):
            wrong.append("--nextgen-name")
    else:
        wrong = [f for f, v in (("--dataset", dataset), ("--nextgen-name", nextgen_name),
                                ("--skip-bad", skip_bad)) if v]
    if wrong:
        kind = "a data set folder" if data.is_dir() else "a metadata file"
        raise CaptionError(f"{data}: {kind} does not use {', '.join(wrong)}; leave it out")


def template_manifest(data, out, dataset: str | None = None, organ: str | None = None,
                      dataset_name: str | None = None, seed: int = 0, tier_weights=TIER_WEIGHTS,
                      image_col: str | None = None, nextgen_name: str | None = None,
                      skip_bad: bool = False, context_length: int = CONTEXT_LENGTH) -> dict:
    """Write a template-caption manifest for a data set folder or a metadata CSV/JSONL.
    Returns a summary (rows, rows per tier, output path)."""
    data, out = Path(data), Path(out)
    out_dir = out.resolve().parent
    check_source_flags(data, dataset, image_col, nextgen_name, skip_bad)
    if data.is_dir():
        extra, (records, keys) = [], folder_records(data, out_dir, dataset, organ, nextgen_name,
                                                    skip_bad)
    else:
        extra, records, keys = csv_records(data, out_dir, image_col, organ)
    name = dataset_name or (data.name if data.is_dir() else data.parent.name)
    for rec in records:
        rec.setdefault("dataset", name)
    counts = add_captions(records, keys, seed, tier_weights, context_length)
    present = list(dict.fromkeys(k for r in records for k in r))
    columns = list(dict.fromkeys([*(c for c in MANIFEST_COLUMNS if c in present), *extra,
                                  *present]))
    write_rows(out, columns, records)
    return {"rows": len(records), "tiers": counts, "out": str(out)}


# ----------------------------------------------------------------------------- the phantom's manifest
def _phantom_root(cfg: PhantomConfig) -> Path:
    """The cache folder of a captioned phantom, named by its settings."""
    organs = "+".join(o.replace(" ", "_") for o in cfg.organs)
    name = f"captions-n{cfg.n}-s{cfg.size}-seed{cfg.seed}-{organs}-normal{cfg.p_normal:g}"
    return Path(cache_dir()) / "phantom" / name


def phantom_manifest(root=None, cfg: PhantomConfig | None = None, caption_seed: int = 0,
                     tier_weights=TIER_WEIGHTS) -> Path:
    """The phantom's image-caption manifest (what `train_contrastive.py` and `evaluate.py` read
    with no --manifest): writes the phantom into `root` (default: a cache folder named by `cfg`)
    if it is not there yet, then `captions-seed{caption_seed}-tiers{weights}.csv` beside its
    images with the three-tier templates (an existing one is reused), and returns that CSV's
    path. The default `cfg` draws all four organs and 17 % normal images, so every tier has
    something to say."""
    cfg = cfg or PhantomConfig(organs=ORGANS, p_normal=0.17)
    root = Path(root) if root else _phantom_root(cfg)
    if not (root / "metadata.jsonl").is_file():
        write_dataset(root, cfg)
    weights = "-".join(f"{w:g}" for w in parse_tier_weights(tier_weights))
    out = root / f"captions-seed{caption_seed}-tiers{weights}.csv"
    if not out.is_file():
        template_manifest(root, out, dataset="busi", dataset_name="phantom", seed=caption_seed,
                          tier_weights=tier_weights)
    return out


# ----------------------------------------------------------------------------- fit command
def fit_manifest(src, out, caption_col: str | None = None,
                 context_length: int = CONTEXT_LENGTH) -> dict:
    """Run fit_to_context over a manifest's captions; every row and column is kept, the old
    caption goes to `original_caption`. Returns {rows, changed}."""
    columns, rows, _ = read_rows(src)
    ccol = pick_column(src, columns, caption_col, CAPTION_COLS, "caption")
    rebase_images(columns, rows, src, out)
    changed = 0
    for row in rows:
        old = row.get(ccol) or ""
        row.setdefault("original_caption", old)
        row[ccol] = fit_to_context(old, context_length) if old else old
        changed += row[ccol] != old
    write_rows(out, list(dict.fromkeys([*columns, "original_caption"])), rows)
    return {"rows": len(rows), "changed": changed, "out": str(out)}


# ----------------------------------------------------------------------------- LLM refinement
TRANSLATE_INSTRUCTIONS = (
    "You prepare captions of medical ultrasound images for training an image-text model. "
    "If the caption is not in English, translate it into English. Then rewrite it as one "
    "concise clinical sentence of at most 45 words that keeps the organ, every finding and "
    "the diagnosis, and adds nothing the caption does not say. Use standard sonographic "
    "terms. Reply with the sentence only: no quotation marks, no notes, no preamble.")
DESCRIBE_INSTRUCTIONS = (
    "You write captions for medical ultrasound images from structured metadata. Write three "
    "different captions of 15 to 60 words each. Every caption must use every field given and "
    "nothing else: do not invent findings, measurements, patient details or diagnoses. Vary "
    "the wording and sentence structure between the three. Reply with exactly three lines "
    "numbered 1., 2. and 3., one caption per line, and nothing else.")
# Sampling settings and seed per mode; describe and echocare follow EchoCare-CLIP's vLLM call
# (generate_llm_captions.py: temperature 1.0, top_p 0.95, repetition penalty 1.05, 320 new
# tokens, seed 42). Only echocare sends the seed (vLLM's per-request SamplingParams.seed).
MODE_DEFAULTS = {
    "translate": {"temperature": 0.2, "top_p": 0.95, "repetition_penalty": None,
                  "max_tokens": 200, "seed": 0},
    "describe": {"temperature": 1.0, "top_p": 0.95, "repetition_penalty": 1.05,
                 "max_tokens": 320, "seed": 0},
    "echocare": {"temperature": 1.0, "top_p": 0.95, "repetition_penalty": 1.05,
                 "max_tokens": 320, "seed": echocare.SEED},
}
# The model each mode was run with: the ultrasound-CLIP paper's (§4.1), EchoCare-CLIP's.
MODE_MODEL = {"translate": "Qwen/Qwen3-8B", "describe": echocare.MODEL, "echocare": echocare.MODEL}
# Columns that are not metadata of the image (left out of describe's field list).
NOT_METADATA = {"image", "caption", "original_caption", "refine_status", "tier", "split",
                "dataset", *IMAGE_COLS, *CAPTION_COLS}
DESCRIBE_N = 3            # captions asked for per describe request; one is kept per row
THINK = re.compile(r"<think>.*?(</think>|$)", re.S)   # reasoning models' hidden thoughts
NUMBERED = re.compile(r"^\s*\(?(\d+)[.):]\s*(.+?)\s*$", re.M)


@dataclass
class RefineConfig:
    mode: str = "translate"                 # translate | describe | echocare
    temperature: float | None = None        # None: the mode's default (MODE_DEFAULTS)
    top_p: float | None = None
    repetition_penalty: float | None = None   # 0 leaves it out of the request
    max_tokens: int | None = None
    seed: int | None = None                 # which caption is kept; which rows (fraction)
    context_length: int = CONTEXT_LENGTH
    concurrency: int = 8
    fraction: float = 1.0                   # refine a seeded fraction of the rows
    only_non_ascii: bool = False            # refine only mostly non-ASCII captions (CURD)
    caption_col: str | None = None
    cache: str | None = None                # default: OUT + ".cache.jsonl"
    extra_body: dict = field(default_factory=dict)   # more request fields, server-specific
    progress: bool = True
    params: dict = field(default_factory=dict, init=False)

    def __post_init__(self):
        if self.mode not in MODE_DEFAULTS:
            raise CaptionError(f"--mode must be one of {sorted(MODE_DEFAULTS)}, got {self.mode!r}")
        if not 0 < self.fraction <= 1 or self.concurrency < 1 or self.context_length < 3:
            raise CaptionError(f"--fraction must be in (0, 1], --concurrency at least 1 and "
                               f"--context-length at least 3; got {self.fraction}, "
                               f"{self.concurrency} and {self.context_length}")
        given = {k: getattr(self, k) for k in MODE_DEFAULTS[self.mode]}
        self.params = {k: (MODE_DEFAULTS[self.mode][k] if v is None else v)
                       for k, v in given.items()}
        self.seed = self.params.pop("seed")
        if self.params["repetition_penalty"] == 0:
            self.params["repetition_penalty"] = None
        if self.mode == "echocare":   # vLLM's SamplingParams(seed=...) of every request
            self.params["seed"] = self.seed


def clean_reply(text: str) -> str:
    """A reply without hidden reasoning, wrapping quotes or extra whitespace."""
    text = " ".join(THINK.sub("", text).split())
    return text.strip("\"'“”‘’` ")


def numbered_captions(text: str) -> list:
    """The captions of a numbered-lines reply ('1. ...', '2) ...'), quotes and bold removed."""
    return [clean_reply(m.group(2).replace("**", "")) for m in
            NUMBERED.finditer(THINK.sub("", text)) if clean_reply(m.group(2).replace("**", ""))]


def reply_check(mode: str):
    """The check a reply must pass to be accepted (and cached); a failed check is retried."""
    def check(text: str) -> None:
        if not clean_reply(text):
            raise llm.BadReply("empty reply")
        # describe asks for three; fewer would shrink the seeded choice (a model that ran out
        # of tokens or ignored the format), so that reply is asked for again
        if mode == "describe" and len(numbered_captions(text)) < DESCRIBE_N:
            raise llm.BadReply(f"fewer than {DESCRIBE_N} numbered captions in the reply: "
                               f"{clean_reply(text)[:60]!r}")
        if mode == "echocare" and not echocare.candidates(text):
            raise llm.BadReply("no caption line in the reply")
    return check


def metadata_lines(row: dict, ccol: str) -> list:
    """'- field: value' lines of a row's metadata columns (describe mode)."""
    skip = NOT_METADATA | {ccol.lower()}
    return [f"- {k.replace('_', ' ')}: {_present(v)}" for k, v in row.items()
            if k.lower() not in skip and _present(v)]


def build_request(row: dict, index: int, ccol: str, model: str,
                  rcfg: RefineConfig) -> dict | None:
    """The chat request for one row, or None when the row has nothing to send."""
    if rcfg.mode == "echocare":
        messages = echocare.messages(row, index, ccol)
        if messages is None:
            return None
    elif rcfg.mode == "translate":
        text = (row.get(ccol) or "").strip()
        if not text:
            return None
        messages = [{"role": "system", "content": TRANSLATE_INSTRUCTIONS},
                    {"role": "user", "content": text}]
    else:
        lines = metadata_lines(row, ccol)
        if not lines:
            return None
        messages = [{"role": "system", "content": DESCRIBE_INSTRUCTIONS},
                    {"role": "user", "content": "Metadata:\n" + "\n".join(lines)}]
    return llm.request_body(model, messages, **{**rcfg.params, **rcfg.extra_body})


def selected(index: int, row: dict, ccol: str, rcfg: RefineConfig) -> bool:
    """Whether a row is refined: the seeded --fraction and --only-non-ascii filters."""
    if rcfg.only_non_ascii and not is_mostly_non_ascii(row.get(ccol) or ""):
        return False
    return rcfg.fraction >= 1 or row_rng(rcfg.seed, index, "fraction").random() < rcfg.fraction


def final_caption(reply: str, index: int, image: str, rcfg: RefineConfig,
                  pick) -> tuple[str, str]:
    """(caption, status) from an accepted reply: describe picks one of its captions with the
    seed and the row, echocare with `pick` (echocare.picker: the authors' one generator per
    run); a caption over the context is fitted ('fitted'), otherwise 'ok'."""
    if rcfg.mode == "describe":
        options = numbered_captions(reply)[:DESCRIBE_N]
        text = options[row_rng(rcfg.seed, index, "pick").randrange(len(options))]
    elif rcfg.mode == "echocare":
        text = pick(image, reply)
    else:
        text = clean_reply(reply)
    if token_count(text) <= rcfg.context_length:
        return text, "ok"
    return fit_to_context(text, rcfg.context_length), "fitted"


def plan_requests(rows: list, ccol: str, model: str, rcfg: RefineConfig) -> tuple[list, dict]:
    """([request key or None per row], {key: body}); identical requests are sent once."""
    keys, bodies = [], {}
    for i, row in enumerate(rows):
        body = build_request(row, i, ccol, model, rcfg) if selected(i, row, ccol, rcfg) else None
        key = llm.request_key(body) if body is not None else None
        if key is not None:
            bodies[key] = body
        keys.append(key)
    return keys, bodies


def apply_replies(rows, keys, replies, ccol, icol, rcfg) -> dict:
    """Write each row's new caption, original and status (in place), in row order;
    {status: count}."""
    counts = {"ok": 0, "fitted": 0, "failed": 0, "skipped": 0}
    pick = echocare.picker(rcfg.seed)
    for i, (row, key) in enumerate(zip(rows, keys)):
        old = row.get(ccol) or ""
        row.setdefault("original_caption", old)
        if key is None:
            status = "skipped"
        elif key not in replies:
            status = "failed"       # kept the original caption
        else:
            image = (row.get(icol) if icol else None) or f"row {i}"
            row[ccol], status = final_caption(replies[key], i, image, rcfg, pick)
        row["refine_status"] = status
        counts[status] += 1
    return counts


def refine_manifest(src, out, chat: llm.ChatConfig, rcfg: RefineConfig) -> dict:
    """Rewrite a manifest's captions through the LLM and write OUT atomically: every row in
    order, the original caption in `original_caption`, the outcome in `refine_status`.
    Answers go to an append-only cache as they arrive. Returns a summary."""
    t0 = time.perf_counter()
    columns, rows, _ = read_rows(src)
    ccol = pick_column(src, columns, rcfg.caption_col, CAPTION_COLS, "caption")
    icol = image_column(columns)
    keys, bodies = plan_requests(rows, ccol, chat.model, rcfg)
    if rcfg.mode == "describe" and rows and not bodies:
        raise CaptionError(f"{src}: no row has metadata columns besides the image and caption; "
                           f"describe writes captions from metadata (use --mode translate)")
    cache = llm.ReplyCache(rcfg.cache or f"{out}.cache.jsonl")
    cached = sum(cache.get(k) is not None for k in bodies)
    try:
        replies, errors, stats = llm.run_requests(chat, bodies, cache, reply_check(rcfg.mode),
                                                  rcfg.concurrency, rcfg.progress)
    finally:
        cache.close()
    counts = apply_replies(rows, keys, replies, ccol, icol, rcfg)
    rebase_images(columns, rows, src, out)
    write_rows(out, list(dict.fromkeys([*columns, "original_caption", "refine_status"])), rows)
    failed = [i for i, k in enumerate(keys) if k is not None and k not in replies]
    return {"rows": len(rows), "requests": len(bodies), "cached": cached,
            "sent": len(bodies) - cached, "retries": stats.retries, **counts,
            "failed_rows": failed, "errors": {i: errors.get(keys[i], "") for i in failed},
            "seconds": round(time.perf_counter() - t0, 2), "out": str(out), "cache": cache.path,
            "torn_cache_lines": cache.torn}
