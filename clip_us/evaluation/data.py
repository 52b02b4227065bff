"""The labelled image–caption set evaluate.py runs on: classes, organs, the split, the overlap check.

EchoCare-CLIP evaluates on a held-out data set (BUSI: 780 images, three classes) split
70/15/15 (117 test, 118 validation, 545 training images); its probes train on the 70 %, pick C on
the 15 % validation part and report on the test part. Here:

- Pairs come from ``clip_us.captions.manifest.read_manifest`` (every format train_contrastive.py
  reads).
- Classes: every label present in the manifest, in clip_us's fixed order (benign, malignant,
  normal) and then alphabetically; ``classes`` restricts them and drops the other images. This
  differs from the supervised scripts, whose binary default follows the ultrasound-CLIP paper.
- Organ: the manifest's ``organ`` column, else the ``organ`` argument.
- Split: images a checkpoint's split.json places in train/val/test stay there; the others (held
  out from that run, or unknown to it) get the authors' split (``clip_us.splits.
  train_test_split_twice``: scikit-learn's train_test_split, stratified by ``dataset``, 15 % test,
  then 15 % of the whole as validation, random_state = the seed), in manifest order, so the same
  rows and seed give the authors' very test images. The caller saves it as split.json (once its
  checks pass); it is reused when it places the same images, with the same seed and algorithm.
  A ``split_file`` replaces both.
- Overlap: test images a model trained on (its split's train and val) are refused unless allowed.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .. import splits
from ..captions.manifest import read_manifest
from ..labels import CLASSES, parse_label

FRACTIONS = (0.70, 0.15, 0.15)
SPLIT = splits.train_test_split_twice   # a fresh split's algorithm (name it in `how`)


@dataclass
class EvalSet:
    """Pairs (one per caption) and images (one per image key) of one manifest."""
    pairs: list          # clip_us.captions.manifest.Pair
    keys: list           # image keys in manifest order
    label: dict          # key -> class index, only when the manifest has labels
    organ: dict          # key -> organ name ("" when unknown)
    dataset: dict        # key -> dataset name
    classes: list        # class names, index order
    report: dict


def _class_name(value: str) -> str:
    v = str(value).strip()
    idx = parse_label(v)
    return CLASSES[idx] if idx is not None else v.lower()


def _order(names) -> list:
    known = [c for c in CLASSES if c in names]
    return known + sorted(set(names) - set(known))


def _labels(pairs, classes_flag) -> tuple[dict, list]:
    """(key -> class name, classes); an image whose captions disagree on its label is an error."""
    names = {}
    for p in pairs:
        if not p.label:
            continue
        name = _class_name(p.label)
        if names.setdefault(p.key, name) != name:
            raise ValueError(f"manifest row {p.row}: image {p.key} is labelled both "
                             f"{names[p.key]!r} and {name!r}")
    classes = _order(set(names.values()))
    if classes_flag:
        wanted = [_class_name(c) for c in classes_flag]
        absent = [c for c in wanted if c not in classes]
        if absent:
            raise ValueError(f"--classes {absent}: not in the manifest (its labels: {classes})")
        classes = _order(wanted)
    return names, classes


def load_eval_set(path, organ: str = "", classes=(), **manifest_kw) -> EvalSet:
    """Read the manifest; with labels, keep only labelled images of the chosen classes."""
    pairs, report = read_manifest(path, **manifest_kw)
    if not pairs:
        raise ValueError(f"{path}: no usable rows")
    names, class_list = _labels(pairs, classes)
    if names:  # a labelled manifest: unlabelled images and other classes are left out
        before = {p.key for p in pairs}
        pairs = [p for p in pairs if names.get(p.key) in class_list]
        report["images_left_out"] = len(before) - len({p.key for p in pairs})
        if not pairs:
            raise ValueError(f"{path}: no image has one of the classes {class_list}")
    keys = list(dict.fromkeys(p.key for p in pairs))
    first = {p.key: p for p in reversed(pairs)}
    label = {k: class_list.index(names[k]) for k in keys} if names else {}
    organs = {k: (first[k].organ or organ).strip().lower() for k in keys}
    return EvalSet(pairs, keys, label, organs, {k: first[k].dataset for k in keys}, class_list, report)


def read_split(path) -> dict:
    """A split.json's parts, any of them absent: a checkpoint's, a --split-file, or a saved one."""
    return splits.read_split(path, need=())


def _parts(saved: dict) -> dict:
    """train, val and test of a split (held_out and how it was made left out)."""
    return {s: saved[s] for s in splits.PARTS}


def choose_split(es: EvalSet, seed: int, split_file: str = "", saved: Path | None = None,
                 checkpoint_split: str | None = None) -> tuple[dict, str, dict | None]:
    """({train, val, test: [keys]}, how it was made, what to save as split.json or None).
    Order of precedence: ``split_file``; else the checkpoint's split.json for the images it
    places, plus the ``saved`` split (when it fits) or a fresh one for the rest."""
    have = set(es.keys)
    if split_file:
        out = splits.keep(_parts(read_split(split_file)), have)
        lost = have - splits.placed(out)
        if lost:
            raise ValueError(f"--split-file {split_file}: {len(lost)} images of the manifest are "
                             f"in none of train/val/test (e.g. {sorted(lost)[0]})")
        return out, f"--split-file {split_file}", None
    ckpt = read_split(checkpoint_split) if checkpoint_split else {s: [] for s in splits.PARTS}
    out = splits.keep(_parts(ckpt), have)
    rest = [k for k in es.keys if k not in splits.placed(out)]
    placed = len(have) - len(rest)
    how = [f"checkpoint split {checkpoint_split} for {placed} images"] if placed else []
    new = None
    if rest:
        fresh, what, new = _fresh_split(es, rest, seed, saved)
        out = {s: out[s] + fresh[s] for s in splits.PARTS}
        how.append(what)
    return out, "; ".join(how), new


def _how(seed: int) -> str:
    return (f"the authors' split: scikit-learn's train_test_split twice, stratified by dataset, "
            f"15 % test, then 15 % of the whole as val, random_state {seed}")


def _reuse(saved: Path, keys, seed: int) -> dict:
    """The saved split's parts, if it places exactly ``keys`` and was made with ``seed`` by this
    algorithm (a file of an older clip_us, made otherwise, would give other test images)."""
    parts = read_split(saved)
    if splits.placed(_parts(parts)) != set(keys):
        raise ValueError(f"{saved} was made for other images than this manifest's (or --classes); "
                         f"delete it or use another --out-dir")
    made_with = parts.get("seed", seed)  # older files: no seed
    if made_with != seed:
        raise ValueError(f"{saved} was made with --seed {made_with}, not {seed}: pass --seed "
                         f"{made_with} to reuse it, or another --out-dir for a new split")
    if parts.get("how", _how(seed)) != _how(seed):
        raise ValueError(f"{saved} was made as {parts['how']!r}, not as {_how(seed)!r}: delete it "
                         f"for a new split, or pass it as --split-file to keep its parts")
    return _parts(parts)


def _fresh_split(es: EvalSet, keys, seed: int, saved: Path | None) -> tuple[dict, str, dict | None]:
    """(parts, how, what to save): ``saved`` reused when it fits, else a new seeded split."""
    if saved is not None and saved.is_file():
        return _reuse(saved, keys, seed), f"reused {saved}", None
    strata = {k: es.dataset.get(k, "") for k in keys}   # prepare_data.py: stratify=df["dataset"]
    parts = SPLIT(keys, strata, FRACTIONS, seed)
    how = _how(seed)
    return parts, how, {"how": how, "seed": seed, **parts}


def check_overlap(test_keys, models, allow: bool) -> dict:
    """{model name: number of test images it trained on, or None when unknown (a trained model
    without a split.json)}; raises unless ``allow``."""
    test = set(test_keys)
    seen = {m.name: len(test & m.trained_on) if m.split_path or m.vanilla else None for m in models}
    bad = {n: c for n, c in seen.items() if c}
    if bad and not allow:
        raise ValueError(f"the test split holds images these models trained on (train/val of their "
                         f"split.json): {bad}. Evaluate on other images, drop --split-file so the "
                         f"checkpoint's own split is used, or pass --allow-overlap to go on anyway")
    return seen
