"""Image–caption manifests: reading (CSV and JSONL), caption cleaning, bad rows, splits, writing.

The contrastive stage of the ultrasound-CLIP paper (§3.1, Fig. 1a) and EchoCare-CLIP both train on
image–caption pairs listed in a table. Formats read, with columns detected (or given):

- ours (CSV or JSONL): ``image``, ``caption`` and optionally ``organ``, ``label``, ``dataset``,
  ``split`` plus any attribute columns (kept as strings in ``Pair.attributes``);
- EchoCare-CLIP's CSV: ``image_path,text_caption,label``;
- NextGen-UIA's fine-tuning CSVs: ``Caption,filename``; the official code finds each image by its
  file name in the ``images/`` folder beside the CSV (``src/datasets/finetune.py``);
- PMC-OA's JSONL: one ``{"image": ..., "caption": ...}`` object per line, images in ``images/``.

Image paths are relative to the manifest's folder. A path that does not exist there is looked up
by its file name in the sibling ``images/`` folder, which is how the NextGen-UIA and PMC-OA
releases are laid out. ``read_rows``, ``pick_column`` and ``write_rows`` are the one reader and
writer of these files: ``python -m clip_us.captions`` (template, fit, refine) uses them too, with
the same accepted columns (IMAGE_COLS, CAPTION_COLS).

Cleaning follows the official NextGen-UIA code (``src/datasets/finetune.py``): delete every
character outside its whitelist (ASCII letters, digits, whitespace, punctuation and a few symbols
such as ± ° µ ≤ ≥ → – —), strip the caption and keep it only if it is longer than 20 characters.
``ascii_only=False`` (``--no-ascii-only``) skips the whitelist and keeps every character.
Captions that are mostly non-ASCII (untranslated CURD captions, for instance) are counted either
way: ``python -m clip_us.captions refine --mode translate`` translates them.

Several manifests (``merge_manifests``; ``train_contrastive.py --manifest A --manifest B``) are
merged as the official code merges MedPix and PMC-CURD: each read and cleaned alike, concatenated
in the order given, split as one set. Keys are then the images' paths relative to the manifests'
common folder; a manifest given twice, or an image two manifests list, is refused.

Splits: a ``split`` column is used as it is; otherwise a seeded 90/10 train/val shuffle that
reproduces the official code's ``df.sample(frac=1, random_state=seed)`` order, or three fractions
(``70,15,15``, EchoCare-CLIP) split as its authors split: scikit-learn's ``train_test_split``
twice, stratified by ``dataset``, rebuilt without scikit-learn. ``hold_out`` keeps whole data sets out of
training (EchoCare-CLIP holds out BUSI and its liver set). Splits are made per image, so an image
with several captions never sits on both sides, and are saved as ``split.json`` for reuse; the
algorithms and split.json are clip_us/splits.py's.

Standard library and PIL, plus clip_us.splits and clip_us.fileio.
"""
from __future__ import annotations

import csv
import io
import json
import os
import re
from dataclasses import dataclass, field, replace
from pathlib import Path

from PIL import Image

from .. import splits
from ..fileio import write_text
from ..splits import save_split

__all__ = ["Pair", "ManifestError", "read_manifest", "merge_manifests", "read_rows", "pick_column", "clean_caption",
           "is_mostly_non_ascii", "describe", "make_split", "save_split", "load_split",
           "split_pairs", "write_rows", "write_manifest", "COLUMNS", "IMAGE_COLS", "CAPTION_COLS",
           "REFINE_HINT"]

COLUMNS = ("image", "caption", "organ", "label", "dataset", "split")  # our own CSV, in this order
IMAGE_COLS = ("image", "image_path", "filename", "file_name", "file", "img", "path")
CAPTION_COLS = ("caption", "text_caption", "text", "report")
KNOWN_FIELDS = ("organ", "label", "dataset", "split")
SPLIT_ALIASES = {"train": "train", "training": "train", "val": "val", "valid": "val",
                 "validation": "val", "dev": "val", "test": "test", "testing": "test"}
MIN_CHARS = 20
# The official fine-tuning code's whitelist (NextGen-UIA src/datasets/finetune.py), verbatim.
NOT_WHITELISTED = re.compile(
    r"[^A-Za-z0-9\s\.,;:\(\)\[\]\{\}\/_\-+\*=<>@&\|\\\^'\"`~\$?#!…\u00B1\u00B0\u00B5\u03BC\u2264"
    r"\u2265\u2248\u2192\u2013\u2014\u2022]")
REFINE_HINT = ("`python -m clip_us.captions refine MANIFEST --mode translate --endpoint URL "
               "--model NAME --out OUT` translates them into English")


class ManifestError(ValueError):
    """A manifest, caption or metadata file (or one of its rows) is unusable; the message names
    the file and row and says what to do. clip_us.captions exports it as CaptionError."""


@dataclass
class Pair:
    """One usable manifest row."""
    key: str                  # the image as the manifest writes it (posix); split.json stores it
    image: Path               # resolved image file
    caption: str              # cleaned caption
    row: int                  # line number in the manifest (header = line 1 for CSV)
    organ: str = ""
    label: str = ""           # as written; clip_us.labels.parse_label maps class names
    dataset: str = ""
    split: str = ""           # train | val | test, or "" when the manifest has no split column
    attributes: dict = field(default_factory=dict)  # every other column, as strings


# ----------------------------------------------------------------------------- caption cleaning
def clean_caption(text, ascii_only: bool = True) -> str:
    """The official cleaning: delete non-whitelisted characters (unless `ascii_only` is False),
    then strip."""
    text = "" if text is None else str(text)
    if ascii_only:
        text = NOT_WHITELISTED.sub("", text)
    return text.strip()


def is_mostly_non_ascii(text: str) -> bool:
    """More than half of the non-space characters are outside ASCII (e.g. Chinese CURD text)."""
    chars = [c for c in str(text) if not c.isspace()]
    return bool(chars) and sum(ord(c) > 127 for c in chars) > len(chars) / 2


# ----------------------------------------------------------------------------- raw rows
def _csv_rows(path: Path, text: str) -> tuple[list[str], list[dict], list[int]]:
    """csv handles quoted commas and newlines; a row's line number is its last line's."""
    reader = csv.DictReader(io.StringIO(text, newline=""))
    try:
        numbered = [(reader.line_num, row) for row in reader]
    except csv.Error as e:
        raise ManifestError(f"{path}:{reader.line_num}: not a valid CSV ({e})") from None
    if not reader.fieldnames:
        raise ManifestError(f"{path}: empty CSV; a manifest needs a header line such as "
                            f"'image,caption'")
    return list(reader.fieldnames), [r for _, r in numbered], [n for n, _ in numbered]


def jsonl_objects(path, lines):
    """(line number, object) per non-empty line of `lines` (a file or lines of text), each one
    JSON object; pmc.py streams PMC-OA's 1.85 M lines through it."""
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except ValueError as e:
            raise ManifestError(f"{path}:{n}: not valid JSON ({e}); each line of a JSONL "
                                f"manifest must be one object") from None
        if not isinstance(obj, dict):
            raise ManifestError(f"{path}:{n}: expected one JSON object per line "
                                f"({{\"image\": ..., \"caption\": ...}}), got {type(obj).__name__}")
        yield n, obj


def _jsonl_rows(path: Path, text: str) -> tuple[list[str], list[dict], list[int]]:
    """One JSON object per non-empty line; the columns are the keys in first-seen order."""
    # io.StringIO splits at "\n" only: U+2028 may stand in a string
    numbered = list(jsonl_objects(path, io.StringIO(text)))
    rows, lines = [obj for _, obj in numbered], [n for n, _ in numbered]
    return list(dict.fromkeys(k for r in rows for k in r)), rows, lines


def read_rows(path) -> tuple[list[str], list[dict], list[int]]:
    """(columns, rows as dicts, each row's line number) of a CSV, or of a JSONL file when the
    name ends in .jsonl or .json: every row, in order, every column as written."""
    path = Path(path)
    if not path.is_file():
        raise ManifestError(f"{path}: file not found")
    try:
        text = path.read_bytes().decode("utf-8-sig")   # Excel's byte-order mark removed
    except UnicodeDecodeError as e:   # CURD-style Chinese files are often GB18030
        raise ManifestError(f"{path}: not UTF-8 (byte {e.start}: {e.reason}); save it as UTF-8, "
                            f"e.g. iconv -f GB18030 -t UTF-8") from None
    return (_jsonl_rows if path.suffix.lower() in (".jsonl", ".json") else _csv_rows)(path, text)


def pick_column(path, columns: list[str], given: str | None, candidates, what: str) -> str:
    """The column named `given` (case-insensitive), else the first of `candidates` present;
    `what` is "image" or "caption" (the flag --image-col / --caption-col names the column)."""
    lower = {c.lower(): c for c in columns}
    if given:
        if given in columns:
            return given
        if given.lower() in lower:
            return lower[given.lower()]
        raise ManifestError(f"{path}: no {what} column {given!r}; the columns are {columns}")
    for c in candidates:
        if c in lower:
            return lower[c]
    raise ManifestError(f"{path}: cannot tell which column holds the {what}: none of "
                        f"{list(candidates)} among {columns}; name it with --{what}-col")


def _format_name(path: Path, image_col: str, caption_col: str) -> str:
    if path.suffix.lower() in (".jsonl", ".json"):
        return "pmc-oa jsonl" if (image_col, caption_col) == ("image", "caption") else "jsonl"
    return {("image", "caption"): "clip_us csv", ("image_path", "text_caption"): "echocare csv",
            ("filename", "Caption"): "nextgen-uia csv"}.get((image_col, caption_col), "csv")


# ----------------------------------------------------------------------------- images
def resolve_image(value: str, folder: Path) -> Path | None:
    """The file a manifest entry names: absolute, relative to the manifest, or by file name in
    the sibling images/ folder (NextGen-UIA, PMC-OA). None when none exists."""
    p = Path(value)
    if p.is_absolute():
        return p if p.is_file() else None
    for candidate in (folder / p, folder / "images" / p.name):
        if candidate.is_file():
            return candidate
    return None


def _image_problem(path: Path) -> str:
    """'' when the image decodes, else what went wrong (the whole file is decoded)."""
    try:
        with Image.open(path) as im:
            im.load()
        return ""
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        return f"cannot be read as an image ({type(e).__name__}: {e})"


class _Bad:
    """Raises at the first bad row, or counts and keeps the messages with skip_bad."""

    def __init__(self, skip: bool):
        self.skip, self.messages = skip, []

    def __call__(self, where: str, what: str):
        msg = f"{where}: {what}"
        if not self.skip:
            raise ManifestError(msg + ". Fix the row or the file, or pass --skip-bad "
                                      "(skip_bad=True) to skip bad rows and count them.")
        self.messages.append(msg)


# ----------------------------------------------------------------------------- reading
def _fields(row: dict, image_col: str, caption_col: str) -> tuple[dict, dict]:
    """(organ/label/dataset/split under lower-case names, every other column), as strings."""
    known, other = {}, {}
    for k, v in row.items():
        if k is None or k in (image_col, caption_col):  # None: extra cells of a ragged CSV row
            continue
        v = "" if v is None else (v if isinstance(v, str) else json.dumps(v))
        if k.lower() in KNOWN_FIELDS:
            known[k.lower()] = v.strip()
        else:
            other[k] = v.strip()
    return known, other


def _split_value(value: str, where: str) -> str:
    if not value:
        return ""
    split = SPLIT_ALIASES.get(value.strip().lower())
    if split is None:
        raise ManifestError(f"{where}: split {value!r} is not one of train, val, test")
    return split


def read_manifest(path, image_col: str | None = None, caption_col: str | None = None,
                  ascii_only: bool = True, skip_bad: bool = False,
                  check_images: bool = True) -> tuple[list[Pair], dict]:
    """(pairs, report) from a CSV or JSONL manifest.

    Rows whose caption is 20 characters or shorter after cleaning are dropped and counted. A row
    whose image is missing or unreadable raises ManifestError naming the row and the file, or
    with ``skip_bad`` is skipped and counted. ``check_images`` decodes every image once.
    The report holds the format, the columns, every rule's drop count, the number of
    mostly-non-ASCII captions and the bad rows' messages.
    """
    path = Path(path)
    columns, rows, lines = read_rows(path)
    icol = pick_column(path, columns, image_col, IMAGE_COLS, "image")
    ccol = pick_column(path, columns, caption_col, CAPTION_COLS, "caption")
    bad = _Bad(skip_bad)
    report = {"manifest": str(path), "format": _format_name(path, icol, ccol), "image_col": icol,
              "caption_col": ccol, "rows": len(rows), "ascii_only": ascii_only,
              "dropped": {"short_caption": 0, "ascii_only": 0, "bad_image": 0},
              "ascii_changed": 0, "mostly_non_ascii": 0, "bad_rows": bad.messages}
    pairs = [p for p in (_pair(path, n, row, icol, ccol, ascii_only, check_images, bad, report)
                         for n, row in zip(lines, rows)) if p is not None]
    report["dropped"]["bad_image"] = len(bad.messages)
    report["kept"] = len(pairs)
    return pairs, report


def _pair(path, n, row, icol, ccol, ascii_only, check_images, bad, report) -> Pair | None:
    """One row -> Pair, or None when a cleaning rule drops it or it is bad (and skipped)."""
    where = f"{path}:{n}"
    raw = "" if row.get(ccol) is None else str(row.get(ccol))
    report["mostly_non_ascii"] += is_mostly_non_ascii(raw)
    caption = clean_caption(raw, ascii_only)
    report["ascii_changed"] += caption != raw.strip()
    if len(caption) <= MIN_CHARS:  # blamed on --ascii-only when the raw caption was long enough
        rule = "ascii_only" if len(raw.strip()) > MIN_CHARS else "short_caption"
        report["dropped"][rule] += 1
        return None
    value = "" if row.get(icol) is None else str(row.get(icol)).strip()
    if not value:
        return bad(where, f"the {icol!r} column is empty")
    image = resolve_image(value, path.parent)
    if image is None:
        return bad(where, f"image {value!r} not found (looked in {path.parent} and "
                          f"{path.parent / 'images'})")
    problem = _image_problem(image) if check_images else ""
    if problem:
        return bad(where, f"image {image} {problem}")
    known, other = _fields(row, icol, ccol)
    return Pair(key=Path(value).as_posix(), image=image, caption=caption, row=n,
                organ=known.get("organ", ""), label=known.get("label", ""),
                dataset=known.get("dataset", ""),
                split=_split_value(known.get("split", ""), where), attributes=other)


def describe(report: dict) -> str:
    """A few lines for the user: what was read, what each rule dropped, what to do next."""
    if "sources" in report:  # merged: each manifest's lines, then the total
        return "\n".join([*(describe(r) for r in report["sources"]),
                          f"merged {len(report['sources'])} manifests in the order given: "
                          f"{report['rows']} rows, {report['kept']} kept"])
    d = report["dropped"]
    lines = [f"manifest {report['manifest']} ({report['format']}, image column "
             f"{report['image_col']!r}, caption column {report['caption_col']!r}): "
             f"{report['rows']} rows, {report['kept']} kept",
             f"  dropped: {d['short_caption']} with a caption of {MIN_CHARS} characters or fewer, "
             f"{d['bad_image']} with a missing or unreadable image (--skip-bad)"]
    if report["ascii_only"]:
        lines.append(f"  the official whitelist (--ascii-only) changed {report['ascii_changed']} "
                     f"captions and dropped {d['ascii_only']} that became {MIN_CHARS} characters "
                     f"or fewer")
    if report["mostly_non_ascii"]:
        lines.append(f"  {report['mostly_non_ascii']} captions are mostly non-ASCII (untranslated "
                     f"text?): {REFINE_HINT}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- several manifests
def _given_once(paths: list[Path]) -> None:
    """A manifest named twice (by any path) would double every one of its rows: refused."""
    seen = {}
    for i, p in enumerate(paths):
        first = seen.setdefault(os.path.realpath(p), i)
        if first != i:
            raise ManifestError(f"--manifest {p} is given twice (also as {paths[first]}); give "
                                f"each manifest once")


def _rekey(groups: list[list[Pair]]) -> list[list[Pair]]:
    """Keys unique across manifests: each image's real path relative to the manifests' common
    folder (two releases both write `images/0001.png` for different files; one file listed by
    two manifests gets one key). split.json stores these keys."""
    real = {p.image: os.path.realpath(p.image) for g in groups for p in g}
    try:
        root = os.path.commonpath([os.path.dirname(r) for r in real.values()])
    except ValueError:  # no pairs, or images on several Windows drives: absolute keys
        root = None
    key = (lambda f: Path(f).as_posix()) if root is None else \
        (lambda f: Path(os.path.relpath(f, root)).as_posix())
    return [[replace(p, key=key(real[p.image])) for p in g] for g in groups]


def _no_shared_images(paths: list[Path], groups: list[list[Pair]]) -> None:
    """An image listed by two manifests is refused (docs/contrastive.md says why): the official
    code's two sets, MedPix and PMC-CURD, share none."""
    first = {}
    for path, group in zip(paths, groups):
        for p in group:
            where, other = first.setdefault(p.key, (path, p))
            if where != path:
                same = "the same caption" if other.caption == p.caption else "different captions"
                raise ManifestError(
                    f"{where}:{other.row} and {path}:{p.row} list the same image {p.image} with "
                    f"{same}; remove it from one manifest (an image with several captions "
                    f"belongs in one manifest, one row per caption)")


def _merged_report(paths: list[Path], reports: list[dict], kept: int) -> dict:
    """The sum of the manifests' reports, each manifest's counts under `manifests`."""
    return {"manifest": [str(p) for p in paths],
            "format": " + ".join(dict.fromkeys(r["format"] for r in reports)),
            "rows": sum(r["rows"] for r in reports), "kept": kept,
            "ascii_only": reports[0]["ascii_only"],
            "dropped": {k: sum(r["dropped"][k] for r in reports) for k in reports[0]["dropped"]},
            **{k: sum(r[k] for r in reports) for k in ("ascii_changed", "mostly_non_ascii")},
            "bad_rows": [m for r in reports for m in r["bad_rows"]],
            "manifests": [{"path": str(p), "rows": r["rows"], "n_kept": r["kept"]}
                          for p, r in zip(paths, reports)],
            "sources": reports}


def merge_manifests(paths, image_col: str | None = None, caption_col: str | None = None,
                    ascii_only: bool = True, skip_bad: bool = False,
                    check_images: bool = True) -> tuple[list[Pair], dict]:
    """(pairs, report) of several manifests, merged as the official fine-tuning data
    (NextGen-UIA src/datasets/finetune.py: pd.concat([medpix_df, pmc_curd_df]), then one
    cleaning pass, then df.sample over the whole): each manifest read and cleaned by
    read_manifest (the same rule on every row of every set), the pairs concatenated in the order
    given; make_split then shuffles the merged set at once.

    One manifest: read_manifest's pairs and report, plus `manifests`. Several: keys rewritten
    unique (_rekey); a manifest given twice, or an image two manifests list, is refused. The
    report sums the counts; `manifests` holds [{path, rows, n_kept}] per manifest.
    """
    paths = [Path(p) for p in paths]
    _given_once(paths)
    read = [read_manifest(p, image_col, caption_col, ascii_only, skip_bad, check_images)
            for p in paths]
    if len(read) == 1:
        pairs, report = read[0]
        return pairs, {**report, "manifests": [{"path": str(paths[0]), "rows": report["rows"],
                                                "n_kept": report["kept"]}]}
    groups = _rekey([pairs for pairs, _ in read])
    _no_shared_images(paths, groups)
    pairs = [p for g in groups for p in g]
    return pairs, _merged_report(paths, [r for _, r in read], len(pairs))


# ----------------------------------------------------------------------------- splits
def _images(pairs: list[Pair]) -> list[str]:
    """Image keys in manifest order, each once."""
    return list(dict.fromkeys(p.key for p in pairs))


def make_split(pairs: list[Pair], spec="90,10", seed: int = 0, hold_out=()) -> dict:
    """{"train", "val", "test", "held_out": [image keys], "how": ...}.

    A manifest with a split column decides itself (every row must have one). Otherwise two
    fractions give the official seeded shuffle (the ultrasound-CLIP paper's), three EchoCare-CLIP's
    split: scikit-learn's train_test_split twice, stratified by `dataset`, on the rows left after
    the held-out data sets are removed (training_experiments/prepare_data.py). ``hold_out`` names
    data sets kept out of train/val/test entirely ("held_out").
    """
    hold = {h.strip().lower() for h in hold_out if h.strip()}
    unknown = hold - {p.dataset.lower() for p in pairs}
    if unknown:
        raise ManifestError(f"--hold-out {sorted(unknown)}: no such dataset in the manifest "
                            f"(its datasets: {sorted({p.dataset for p in pairs})})")
    held = _images([p for p in pairs if p.dataset.lower() in hold])
    rest = [p for p in pairs if p.dataset.lower() not in hold]
    if any(p.split for p in pairs):
        out, how = _from_column(rest), "the manifest's split column"
    else:
        fractions = splits.parse_fractions(spec, ManifestError)
        algorithm, how = ((splits.seeded_shuffle, f"seeded shuffle {spec}") if len(fractions) == 2
                          else (splits.train_test_split_twice, f"{spec} as scikit-learn's "
                                "train_test_split twice, stratified by dataset"))
        try:
            out = algorithm(_images(rest), {p.key: p.dataset for p in rest}, fractions, seed)
        except ValueError as e:   # scikit-learn's rules on too few images per data set
            raise ManifestError(f"{e}; or give the manifest a split column") from e
    return {**out, "held_out": held, "how": how + (f", held out {sorted(hold)}" if hold else "")}


def _from_column(pairs: list[Pair]) -> dict:
    missing = [p for p in pairs if not p.split]
    if missing:
        raise ManifestError(f"row {missing[0].row}: the split column is empty ({len(missing)} "
                            f"rows are); fill it for every row or drop the column")
    out, seen = {s: [] for s in splits.PARTS}, {}
    for p in pairs:
        if seen.setdefault(p.key, p.split) != p.split:
            raise ManifestError(f"row {p.row}: image {p.key} is in both {seen[p.key]} and "
                                f"{p.split}; an image must stay in one split")
        if p.key not in out[p.split]:
            out[p.split].append(p.key)
    return out


def load_split(path, pairs: list[Pair], strict: bool = True) -> dict:
    """A saved split, restricted to the images `pairs` has. With ``strict``, an image of
    `pairs` that the split does not place is an error (the manifest changed since)."""
    path = Path(path)
    parts = {k: v for k, v in splits.read_split(path, ("train",), ManifestError).items()
             if k in splits.ALL_PARTS}
    placed = splits.placed(parts)
    have = set(_images(pairs))
    unplaced = sorted(have - placed)
    if strict and unplaced:
        raise ManifestError(f"{path}: {len(unplaced)} images of the manifest are in no split "
                            f"(e.g. {unplaced[0]}): the manifest changed since the split was "
                            f"made; delete {path.name} or use a new --out-dir")
    return {**splits.keep(parts, have), "how": f"reused {path}", "not_in_manifest": len(placed - have)}


def split_pairs(pairs: list[Pair], split: dict) -> dict[str, list[Pair]]:
    """{part: [Pair]} with every caption of an image in its image's part, manifest order."""
    where = {k: part for part in splits.ALL_PARTS for k in split.get(part, [])}
    out = {part: [] for part in splits.ALL_PARTS}
    for p in pairs:
        if p.key in where:
            out[where[p.key]].append(p)
    return out


# ----------------------------------------------------------------------------- writing
def _relative(image, folder: Path) -> str:
    """Posix path relative to the manifest's folder when possible, else absolute."""
    p = Path(image)
    if not p.is_absolute():
        return p.as_posix()
    try:
        return Path(os.path.relpath(p, folder)).as_posix()
    except ValueError:  # another drive on Windows
        return p.as_posix()


def write_rows(path, columns: list, rows: list) -> None:
    """CSV, or JSONL when the name ends in .jsonl or .json (as read_rows reads it), written
    atomically: the columns in order, a row's missing ones empty."""
    if Path(path).suffix.lower() in (".jsonl", ".json"):
        text = "".join(json.dumps({c: r.get(c, "") for c in columns}, ensure_ascii=False) + "\n"
                       for r in rows)
    else:
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
        writer.writeheader()
        writer.writerows({c: r.get(c, "") for c in columns} for r in rows)
        text = buf.getvalue()
    write_text(path, text)


def write_manifest(path, rows: list[dict]) -> Path:
    """Write our own manifest (atomic) with write_rows.

    Each row is a dict with ``image`` (a path; absolute ones are made relative to the manifest)
    and ``caption``, and optionally organ, label, dataset, split and any attribute keys. Columns:
    COLUMNS that any row has, in that order, then the other keys in first-seen order.
    """
    path = Path(path)
    folder = path.parent.resolve()
    for i, r in enumerate(rows):
        if not r.get("image") or r.get("caption") is None:
            raise ManifestError(f"write_manifest: row {i} needs 'image' and 'caption', got {r}")
    rows = [{**r, "image": _relative(r["image"], folder)} for r in rows]
    keys = list(dict.fromkeys(k for r in rows for k in r))
    columns = [c for c in COLUMNS if c in keys or c in ("image", "caption")] + \
        [k for k in keys if k not in COLUMNS]
    write_rows(path, columns, rows)
    return path
