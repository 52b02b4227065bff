"""Splits: which images train, which validate, which test, and the split.json that keeps them.

Every split here is made per image key and seeded, so the same images and seed give the same
parts on any machine. The algorithms share one signature, ``(keys, strata, fractions, seed) ->
{"train", "val", "test": [keys]}``, so a caller swaps one for another in one line:

- ``stratified``: per stratum (label, data set, ...), a seeded shuffle cut by the fractions;
  every part but the first gets round(n * f) of each stratum, the first the rest. The supervised
  scripts split 8:1:1 by label (the ultrasound-CLIP paper, Qu et al. §4.2);
- ``seeded_shuffle``: the official NextGen-UIA fine-tuning split, pandas'
  ``df.sample(frac=1, random_state=seed)`` cut at int(n * 0.9) (train_contrastive.py's default);
- ``train_test_split_twice``: EchoCare-CLIP's split (its ``training_experiments/prepare_data.py``),
  scikit-learn's stratified ``train_test_split`` run twice, rebuilt draw for draw with numpy's
  legacy RandomState, so the same rows and seed give the authors' very parts (evaluate.py's, and
  train_contrastive.py's three-part ``--split``, by data set).

split.json holds the parts (``train``, ``val``, ``test`` and, for manifests, ``held_out``) beside
whatever says how they were made (seed, data fingerprint, ...); ``read_split`` and
``save_split`` are its only reader and writer. Callers pass their own error class, so a bad file
reports as the kind of input it belongs to (a data set, a manifest).
"""
from __future__ import annotations

import json
import math
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


# scikit-learn's StratifiedShuffleSplit (sklearn.model_selection._split) and the helper it
# allocates with (sklearn.utils.extmath._approximate_mode), step for step: every draw from the
# RandomState comes in the same order, so the same rows, strata and seed give the same parts.
def _approximate_mode(counts: np.ndarray, n_draws: int, rng: np.random.RandomState) -> np.ndarray:
    """How many of `n_draws` each class gets: the floor of its share, then one more per class in
    order of the largest remainder, ties drawn at random (rng.choice) as scikit-learn does."""
    continuous = counts / counts.sum() * n_draws
    floored = np.floor(continuous)
    need = int(n_draws - floored.sum())
    remainder = continuous - floored
    for value in np.sort(np.unique(remainder))[::-1]:
        if need == 0:
            break
        tied = np.flatnonzero(remainder == value)
        chosen = rng.choice(tied, size=min(len(tied), need), replace=False)
        floored[chosen] += 1
        need -= len(chosen)
    return floored.astype(int)


def _check_strata(names, counts, sizes: dict) -> None:
    """scikit-learn's rules, which the authors' split obeys, with what to do instead."""
    fix = ("add images, leave such data sets out of the manifest (or hold them out), or give a "
           "split of your own (evaluate.py --split-file)")
    lonely = names[counts < 2].tolist()
    if lonely:
        raise ValueError(f"the authors' split (scikit-learn's train_test_split stratified by data set) "
                         f"needs at least 2 images per stratum; {lonely} have 1: {fix}")
    for part, n in sizes.items():
        if n < len(names):
            raise ValueError(f"the authors' split gives the {part} part {n} images, fewer than the "
                             f"{len(names)} strata {names.tolist()} it is stratified over: {fix}")


def _stratified_shuffle_split(y: np.ndarray, test_size: float, seed: int, parts: tuple):
    """(kept, taken) positions into `y`: scikit-learn's train_test_split(rows, test_size=test_size,
    stratify=y, random_state=seed), one StratifiedShuffleSplit draw. Both come in its order."""
    n_test = math.ceil(test_size * len(y))   # scikit-learn's _validate_shuffle_split
    n_train = len(y) - n_test
    if not 0 < test_size < 1 or n_train <= 0:
        raise ValueError(f"the authors' split: a {parts[1]} share of {test_size:g} of {len(y)} images "
                         f"leaves the {parts[0]} part empty; give the train part a share above 0")
    names, inverse, counts = np.unique(y, return_inverse=True, return_counts=True)
    _check_strata(names, counts, dict(zip(parts, (n_train, n_test))))
    by_class = np.split(np.argsort(inverse, kind="stable"), np.cumsum(counts)[:-1])
    rng = np.random.RandomState(seed)
    n_kept = _approximate_mode(counts, n_train, rng)
    n_taken = _approximate_mode(counts - n_kept, n_test, rng)
    kept, taken = [], []
    for rows, k, t in zip(by_class, n_kept, n_taken):
        rows = rows[rng.permutation(len(rows))]
        kept.extend(rows[:k])
        taken.extend(rows[k:k + t])
    return rng.permutation(kept), rng.permutation(taken)


def train_test_split_twice(keys: list, strata: dict, fractions, seed: int) -> dict:
    """EchoCare-CLIP's split (training_experiments/prepare_data.py's safe_split, twice):
    train_test_split(rows, test_size=test, stratify=dataset, random_state=seed), then the same
    on the rest, in the order the first call returned it, with test_size = val / (1 - test) of
    the rest (15 % of the whole for 70/15/15). On 780 BUSI rows: 117 test, ceil(0.15 / 0.85 *
    663) = 118 val, 545 train. Parts list keys in scikit-learn's order. `strata` maps keys to
    scalars (the data set). The authors concatenate data sets in name order; that order does not
    change the parts, only each stratum's own row order (here `keys` order) does. A share of 0
    skips its call. Too few images per stratum stop with scikit-learn's rule (the authors'
    safe_split then printed a warning and fell back to an unstratified split; we stop)."""
    test = fractions[2] if len(fractions) == 3 else 0.0
    y = np.array([strata[k] for k in keys])
    rest, test_at = np.arange(len(keys)), np.arange(0)
    if test:
        rest, test_at = _stratified_shuffle_split(y, test, seed, ("train and val", "test"))
    train_at, val_at = rest, np.arange(0)
    if fractions[1]:
        train_at, val_at = _stratified_shuffle_split(y[rest], fractions[1] / (1.0 - test), seed,
                                                     ("train", "val"))
        train_at, val_at = rest[train_at], rest[val_at]
    return {"train": [keys[i] for i in train_at], "val": [keys[i] for i in val_at],
            "test": [keys[i] for i in test_at]}


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
