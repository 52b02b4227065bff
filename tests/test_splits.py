"""Splits: the supervised scripts' and the caption manifests' splits pinned to what they were
before the split makers became clip_us/splits.py, so the same images and seed land in the same
parts; evaluate.py's split, EchoCare-CLIP's (scikit-learn's train_test_split twice), against
scikit-learn itself (a test-only peer); the split.json reader and writer; the algorithms' shared
signature."""
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from clip_us import data, splits
from clip_us.captions import manifest as mf
from clip_us.evaluation import data as evaldata


def digest(parts: dict) -> str:
    """A short hash of the parts, in order (the order is what split.json stores)."""
    return hashlib.sha256(json.dumps({k: parts[k] for k in sorted(parts) if k != "how"})
                          .encode()).hexdigest()[:16]


def items(n):
    return [data.Item(f"{('benign', 'malignant', 'normal')[i % 7 % 3]}/img ({i}).png", Path(f"x{i}"),
                      (), i % 7 % 3) for i in range(n)]


def pairs(n, datasets=("busi", "thyroid", "liver")):
    """n images with one caption each, every fifth with a second caption further down."""
    def pair(i, caption, row):
        return mf.Pair(key=f"img{i:03d}.png", image=None, caption=caption, row=row,
                       dataset=datasets[i * 7 % 11 % len(datasets)])
    return [pair(i, f"caption {i} " * 3, i + 2) for i in range(n)] + \
        [pair(i, "second caption", n + i + 2) for i in range(0, n, 5)]


TWICE = "as scikit-learn's train_test_split twice, stratified by dataset"


def sizes(parts, names=splits.PARTS):
    return [len(parts[k]) for k in names]


# ----------------------------------------------------------------------------- pinned: data.py
@pytest.mark.parametrize("seed,expected", [(0, "0943c15ef3b90519"), (1, "741c57b7c6c9d50b"),
                                           (42, "4aff4742c3866231")])
def test_supervised_8_1_1_split_is_unchanged(seed, expected):
    parts, how = data.make_split(items(97), None, seed)
    assert (digest(parts), how, sizes(parts)) == (expected, "8:1:1 stratified", [77, 10, 10])


@pytest.mark.parametrize("seed,expected", [(0, "0ed67bcf04d1997f"), (3, "014eae76c3195e56")])
def test_supervised_predefined_test_then_8_2_is_unchanged(seed, expected):
    it = items(97)
    parts, how = data.make_split(it, {"test": [x.key for x in it[::5]]}, seed)
    assert (digest(parts), how) == (expected, "predefined test, rest 8:2 stratified")
    assert sizes(parts) == [62, 15, 20]


def test_supervised_small_split_keys():
    parts, _ = data.make_split(items(23), None, 5)
    assert parts == {
        "train": ["benign/img (0).png", "malignant/img (1).png", "benign/img (3).png",
                  "malignant/img (4).png", "normal/img (5).png", "benign/img (6).png",
                  "benign/img (7).png", "normal/img (9).png", "benign/img (10).png",
                  "malignant/img (11).png", "normal/img (12).png", "benign/img (14).png",
                  "malignant/img (15).png", "normal/img (16).png", "benign/img (17).png",
                  "benign/img (21).png", "malignant/img (22).png"],
        "val": ["normal/img (2).png", "benign/img (13).png", "malignant/img (18).png"],
        "test": ["malignant/img (8).png", "normal/img (19).png", "benign/img (20).png"]}


# ----------------------------------------------------------------------------- pinned: manifests
@pytest.mark.parametrize("spec,seed,hold,expected,how,n", [
    ("90,10", 0, (), "3478653b042f5fc4", "seeded shuffle 90,10", [90, 11, 0, 0]),
    ("90,10", 7, (), "a96cb64105b1a26b", "seeded shuffle 90,10", [90, 11, 0, 0]),
    # Three parts: EchoCare-CLIP's split (train_test_split twice), pinned since make_split moved to
    # it from splits.stratified (whose digests were 69201f2371c716cf and fded8aa962d110df).
    ("70,15,15", 0, (), "bdccc6d90e8274d6", f"70,15,15 {TWICE}", [69, 16, 16, 0]),
    ("70,15,15", 42, ("liver",), "be3dd96fbdb8f4f8", f"70,15,15 {TWICE}, held out ['liver']",
     [51, 11, 12, 27]),
    ("80,20", 3, ("BUSI",), "33d5d7d38361597d", "seeded shuffle 80,20, held out ['busi']",
     [51, 13, 0, 37])])
def test_manifest_splits_are_unchanged(spec, seed, hold, expected, how, n):
    parts = mf.make_split(pairs(101), spec, seed, hold)
    assert (digest(parts), parts["how"], sizes(parts, splits.ALL_PARTS)) == (expected, how, n)


def test_manifest_small_split_keys():
    assert mf.make_split(pairs(20), "70,15,15", 1) == {
        "train": ["img003.png", "img010.png", "img006.png", "img011.png", "img007.png", "img009.png",
                  "img015.png", "img012.png", "img019.png", "img004.png", "img000.png", "img017.png",
                  "img008.png", "img018.png"],
        "val": ["img016.png", "img002.png", "img001.png"],
        "test": ["img013.png", "img014.png", "img005.png"], "held_out": [], "how": f"70,15,15 {TWICE}"}
    # 12 images: 2 test images for 3 data sets, below scikit-learn's rule
    with pytest.raises(mf.ManifestError, match="test part 2 images, fewer than the 3 strata.*split column"):
        mf.make_split(pairs(12), "70,15,15", 1)


# ----------------------------------------------------------------------------- evaluate.py: the authors'
def authors_split(keys, dataset, seed, test_size=0.15, val_size=0.15):
    """training_experiments/prepare_data.py's split, as its authors ran it: safe_split twice,
    train_test_split(df, test_size, stratify=df["dataset"], random_state=seed), the second on the
    first's train part (in the order it returned) with val_size / (1 - test_size)."""
    from sklearn.model_selection import train_test_split
    rows = np.array(keys, dtype=object)
    y = np.array([dataset[k] for k in keys], dtype=object)
    train_val, test, y_train_val, _ = train_test_split(rows, y, test_size=test_size, stratify=y,
                                                       random_state=seed)
    train, val = train_test_split(train_val, test_size=val_size / (1.0 - test_size),
                                  stratify=y_train_val, random_state=seed)
    return {"train": train.tolist(), "val": val.tolist(), "test": test.tolist()}


def busi_like(n=780):
    """Shaped like the authors' BUSI held-out set: one data set, 437 benign, 210 malignant and
    133 normal images, listed class by class as BUSI's folders are."""
    keys = [f"{c} ({i}).png" for c, m in (("benign", 437), ("malignant", 210), ("normal", 133))
            for i in range(1, m + 1)][:n]
    return keys, {k: "Dataset_BUSI_with_GT" for k in keys}


def uneven(sizes, seed=0):
    """Data sets of uneven sizes, their rows interleaved at random."""
    names = np.repeat([f"set_{chr(97 + i)}" for i in range(len(sizes))], sizes)
    np.random.default_rng(seed).shuffle(names)
    keys = [f"img{i:04d}.png" for i in range(len(names))]
    return keys, dict(zip(keys, names.tolist()))


def test_busi_held_out_split_is_the_authors():
    pytest.importorskip("sklearn")
    keys, dataset = busi_like()
    parts = splits.train_test_split_twice(keys, dataset, (0.70, 0.15, 0.15), 42)
    assert sizes(parts) == [545, 118, 117]  # 117 test, then ceil(0.15 / 0.85 * 663) = 118 val
    assert parts == authors_split(keys, dataset, 42)  # the same images, in the same order


@pytest.mark.parametrize("shape,seed", [((500, 37, 1210, 2, 96), 42), ((3, 3, 40), 0),
                                        ((250, 251), 7), ((61, 900, 17, 17), 2024)])
def test_several_data_sets_split_as_scikit_learn(shape, seed):
    pytest.importorskip("sklearn")
    keys, dataset = uneven(shape, seed)
    parts = splits.train_test_split_twice(keys, dataset, (0.70, 0.15, 0.15), seed)
    assert parts == authors_split(keys, dataset, seed)
    # The authors concatenate data sets in name order; only each data set's own row order counts.
    by_name = sorted(keys, key=dataset.__getitem__)
    assert splits.train_test_split_twice(by_name, dataset, (0.70, 0.15, 0.15), seed) == parts


def test_other_shares_split_as_scikit_learn():
    pytest.importorskip("sklearn")
    keys, dataset = uneven((120, 45, 300), 3)
    parts = splits.train_test_split_twice(keys, dataset, (0.6, 0.1, 0.3), 5)
    assert parts == authors_split(keys, dataset, 5, test_size=0.3, val_size=0.1)
    two = splits.train_test_split_twice(keys, dataset, (0.8, 0.2), 5)  # no test part: one call
    from sklearn.model_selection import train_test_split
    train, val = train_test_split(np.array(keys), test_size=0.2, random_state=5,
                                  stratify=[dataset[k] for k in keys])
    assert two == {"train": train.tolist(), "val": val.tolist(), "test": []}


def test_manifest_70_15_15_is_the_authors_split_after_hold_out():
    """make_split on a manifest of several data sets, one held out: the held-out rows leave
    first, then scikit-learn's two train_test_split calls on the rest, as prepare_data.py."""
    pytest.importorskip("sklearn")
    keys, dataset = uneven((90, 140, 35, 60), 11)
    manifest = [mf.Pair(key=k, image=None, caption=f"caption of {k} " * 2, row=i + 2,
                        dataset=dataset[k]) for i, k in enumerate(keys)]
    parts = mf.make_split(manifest, "70,15,15", 42, ["SET_C"])
    rest = [k for k in keys if dataset[k] != "set_c"]
    assert {k: parts[k] for k in splits.PARTS} == authors_split(rest, dataset, 42)
    assert parts["held_out"] == [k for k in keys if dataset[k] == "set_c"]
    assert mf.make_split(manifest, "90,10", 42)["train"] == [  # two parts: the official shuffle
        keys[i] for i in np.random.RandomState(42).permutation(len(keys))[:int(len(keys) * 0.9)]]


def test_too_small_for_scikit_learns_rules_fails_saying_what_to_do():
    keys, dataset = uneven((40, 1))
    with pytest.raises(ValueError, match=r"at least 2 images per stratum; \['set_b'\] have 1.*--split-file"):
        splits.train_test_split_twice(keys, dataset, (0.70, 0.15, 0.15), 42)
    keys, dataset = uneven((10, 2, 2, 2))  # 16 images: 3 test images for 4 data sets
    with pytest.raises(ValueError, match=r"gives the test part 3 images, fewer than the 4 strata"):
        splits.train_test_split_twice(keys, dataset, (0.70, 0.15, 0.15), 42)
    with pytest.raises(ValueError, match="leaves the train part empty"):
        splits.train_test_split_twice(keys, dataset, (0, 0.5, 0.5), 42)


def test_evaluation_split_is_the_authors(tmp_path):
    pytest.importorskip("sklearn")
    keys, dataset = busi_like()
    es = evaldata.EvalSet([], keys, {k: i % 3 for i, k in enumerate(keys)}, {}, dataset,
                          ["benign", "malignant", "normal"], {})
    parts, how, new = evaldata.choose_split(es, 42, saved=tmp_path / "split.json")
    assert parts == authors_split(keys, dataset, 42) and sizes(parts) == [545, 118, 117]
    assert how.startswith("the authors' split: scikit-learn's train_test_split twice, stratified by "
                          "dataset") and how.endswith("random_state 42")
    assert new == {"how": how, "seed": 42, **parts}
    splits.save_split(tmp_path / "split.json", parts, seed=42, how="70/15/15 stratified by "
                      "dataset then label, seed 42")  # an older clip_us's split: other images
    with pytest.raises(ValueError, match="was made as '70/15/15 stratified.*delete it"):
        evaldata.choose_split(es, 42, saved=tmp_path / "split.json")


# ----------------------------------------------------------------------------- the module itself
def test_algorithms_share_one_signature_and_place_every_key_once():
    keys = [f"k{i}" for i in range(40)]
    strata = {k: i % 3 for i, k in enumerate(keys)}
    for algorithm, fractions in ((splits.stratified, (0.7, 0.15, 0.15)),
                                 (splits.stratified, (0.8, 0.2)),
                                 (splits.seeded_shuffle, (0.9, 0.1)),
                                 (splits.train_test_split_twice, (0.7, 0.15, 0.15)),
                                 (splits.train_test_split_twice, (0.8, 0.2))):
        parts = algorithm(keys, strata, fractions, 0)
        assert set(parts) == set(splits.PARTS) and sorted(sum(parts.values(), [])) == sorted(keys)
        assert parts == algorithm(keys, strata, fractions, 0) != algorithm(keys, strata, fractions, 1)
    assert splits.in_order({"a": ["k3", "k1"]}, keys) == {"a": ["k1", "k3"]}


def test_split_json_round_trip_and_errors(tmp_path):
    path = tmp_path / "split.json"
    splits.save_split(path, {"train": ["a"], "val": ["b"], "test": []}, seed=3, how="x")
    saved = splits.read_split(path)
    assert saved["seed"] == 3 and saved["train"] == ["a"] and saved["held_out"] == []
    assert list(json.loads(path.read_text())) == ["seed", "how", "train", "val", "test"]
    path.write_text('{"train": ["a"]}')
    assert splits.read_split(path, need=("train",))["val"] == []
    with pytest.raises(ValueError, match=r"split\.json: not a split file \(KeyError.*'val'"):
        splits.read_split(path)
    path.write_text("[1, 2]")
    with pytest.raises(mf.ManifestError, match="not a split file"):
        splits.read_split(path, error=mf.ManifestError)
    with pytest.raises(ValueError, match=r"nope\.json: not a split file \(FileNotFoundError"):
        splits.read_split(tmp_path / "nope.json")
    with pytest.raises(ValueError, match="'a' is in both the train and the val split"):
        splits.check_disjoint({"train": ["a"], "val": ["a"]}, path)
    with pytest.raises(ValueError, match="train,val"):
        splits.parse_fractions("100")
