"""Splits: which images train, which validate, which test, and the split.json that keeps them.

Every split here is made per image key and seeded, so the same images and seed give the same
parts on any machine. The algorithms share one signature, ``(keys, strata, fractions, seed) ->
{"train", "val", "test": [keys]}``, so a caller swaps one for another in one line:

- ``stratified``: per stratum (label, data set, ...), a seeded shuffle cut by the fractions;
  every part but the first gets round(n * f) of each stratum, the first the rest. The supervised
  scripts split 8:1:1 by label (the ultrasound-CLIP paper, Qu et al. §4.2), train_contrastive.py's
  three-part ``--split`` by data set, evaluate.py 70/15/15 by (data set, label) (EchoCare-CLIP);
- ``seeded_shuffle``: the official NextGen-UIA fine-tuning split, pandas'
  ``df.sample(frac=1, random_state=seed)`` cut at int(n * 0.9) (train_contrastive.py's default).

split.json holds the parts (``train``, ``val``, ``test`` and, for manifests, ``held_out``) beside
whatever says how they were made (seed, data fingerprint, ...); ``read_split`` and
``save_split`` are its only reader and writer. Callers pass their own error class, so a bad file
reports as the kind of input it belongs to (a data set, a manifest).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .fileio import write_json

PARTS = ("train", "val", "test")
ALL_PARTS = (*PARTS, "held_out")   # held_out: whole data sets kept out of training (manifests)


# ----------------------------------------------------------------------------- algorithms
def parse_fractions(spec, error=ValueError) -> tuple[float, ...]:
    """'90,10' or '70,15,15' (or numbers) -> fractions of train, val[, test] summing to 1."""
    parts = [float(x) for x in (spec.split(",") if isinstance(spec, str) else spec)]
    if len(parts) not in (2, 3) or any(p < 0 for p in parts) or sum(parts) <= 0:
        raise error(f"split {spec!r}: give train,val (e.g. 90,10) or train,val,test "
                    f"(e.g. 70,15,15) as non-negative numbers")
    return tuple(p / sum(parts) for p in parts)


def seeded_shuffle(keys: list, strata, fractions, seed: int) -> dict:
    """The official code's split (strata unused): pandas' df.sample(frac=1, random_state=seed)
    is RandomState(seed).permutation; train is the first int(n * fractions[0]), val the rest."""
    order = [keys[i] for i in np.random.RandomState(seed).permutation(len(keys))]
    cut = int(len(keys) * fractions[0])
    return {"train": order[:cut], "val": order[cut:], "test": []}


def stratified(keys: list, strata: dict, fractions, seed: int) -> dict:
    """Per stratum (sorted), its keys in `keys` order shuffled by one seeded generator, then cut:
    parts 2.. get round(n * f), part 1 the rest. Parts list keys stratum by stratum, each in its
    shuffled order (``in_order`` puts them back in `keys` order)."""
    rng = np.random.default_rng(seed)
    out = {part: [] for part in PARTS}
    for name in sorted({strata[k] for k in keys}):
        group = [k for k in keys if strata[k] == name]
        group = [group[i] for i in rng.permutation(len(group))]
        sizes = [int(round(len(group) * f)) for f in fractions[1:]]
        ends = np.cumsum([len(group) - sum(sizes), *sizes]).tolist()   # the last is len(group)
        for part, lo, hi in zip(PARTS, [0, *ends], ends):
            out[part] += group[lo:hi]
    return out


def in_order(parts: dict, keys: list) -> dict:
    """Each part's keys in their `keys` order (the supervised scripts list images that way)."""
    position = {k: i for i, k in enumerate(keys)}
    return {part: sorted(v, key=position.__getitem__) for part, v in parts.items()}


# ----------------------------------------------------------------------------- parts
def placed(parts: dict) -> set:
    """Every key the parts hold."""
    return {k for v in parts.values() for k in v}


def keep(parts: dict, have) -> dict:
    """The parts restricted to the keys in `have`, order kept."""
    have = set(have)
    return {part: [k for k in v if k in have] for part, v in parts.items()}


def check_disjoint(parts: dict, where, error=ValueError) -> None:
    """An image in two parts (a test image trained on) is an error."""
    seen = {}
    for part, keys in parts.items():
        for k in keys:
            if seen.setdefault(k, part) != part:
                raise error(f"{where}: {k!r} is in both the {seen[k]} and the {part} split; "
                            f"an image must be in one split only")


# ----------------------------------------------------------------------------- split.json
def read_split(path, need=PARTS, error=ValueError) -> dict:
    """split.json as saved, with every part of ALL_PARTS a list ([] when absent). A part in
    `need` must be there; an unreadable file or a missing part raises `error`."""
    try:
        saved = json.loads(Path(path).read_text(encoding="utf-8-sig"))
        return {**saved, **{k: list(saved[k]) if k in need or k in saved else [] for k in ALL_PARTS}}
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise error(f"{path}: not a split file ({type(e).__name__}: {e}); it must be a JSON "
                    f"object whose {'/'.join(need or PARTS)} are lists of image keys: fix it, "
                    f"point to another file, or delete it to make a new split") from e


def save_split(path, parts: dict, **meta) -> None:
    """split.json (atomic): how the parts were made (`meta`), then the parts."""
    write_json(path, {**meta, **parts}, indent=1)
