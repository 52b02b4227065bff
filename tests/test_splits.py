"""Splits: every caller's split pinned to what it was before the three split makers (data.py,
the caption manifests, evaluate.py's data) became clip_us/splits.py, so the same images and seed
land in the same parts; the split.json reader and writer; the algorithms' shared signature."""
import hashlib
import json
from pathlib import Path

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


def evalset(n):
    keys = [f"case{i:03d}.png" for i in range(n)]
    dataset = {k: ("busi", "udiat")[i % 4 == 0] for i, k in enumerate(keys)}
    label = {k: i * 5 % 13 % 3 for i, k in enumerate(keys)}
    return evaldata.EvalSet([], keys, label, {}, dataset, ["benign", "malignant", "normal"], {})


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
    ("70,15,15", 0, (), "69201f2371c716cf", "70,15,15 stratified by dataset", [69, 16, 16, 0]),
    ("70,15,15", 42, ("liver",), "fded8aa962d110df",
     "70,15,15 stratified by dataset, held out ['liver']", [50, 12, 12, 27]),
    ("80,20", 3, ("BUSI",), "33d5d7d38361597d", "seeded shuffle 80,20, held out ['busi']",
     [51, 13, 0, 37])])
def test_manifest_splits_are_unchanged(spec, seed, hold, expected, how, n):
    parts = mf.make_split(pairs(101), spec, seed, hold)
    assert (digest(parts), parts["how"], sizes(parts, splits.ALL_PARTS)) == (expected, how, n)


def test_manifest_small_split_keys():
    assert mf.make_split(pairs(12), "70,15,15", 1) == {
        "train": ["img011.png", "img000.png", "img002.png", "img007.png", "img005.png",
                  "img009.png", "img010.png", "img008.png"],
        "val": ["img004.png", "img001.png"], "test": ["img006.png", "img003.png"],
        "held_out": [], "how": "70,15,15 stratified by dataset"}


# ----------------------------------------------------------------------------- pinned: evaluate.py
@pytest.mark.parametrize("seed,expected", [(0, "22d71d7cec197ef4"), (42, "0a4d7566dc1b4a89")])
def test_evaluation_split_is_unchanged(seed, expected):
    parts, how, new = evaldata.choose_split(evalset(89), seed)
    assert (digest(parts), sizes(parts)) == (expected, [63, 13, 13])
    assert how == f"70/15/15 stratified by dataset then label, seed {seed}"
    assert new == {"how": how, "seed": seed, **parts}


def test_evaluation_small_split_keys():
    parts, _, _ = evaldata.choose_split(evalset(14), 42)
    assert parts == {"train": ["case013.png", "case009.png", "case011.png", "case006.png",
                               "case002.png", "case001.png", "case003.png", "case010.png",
                               "case000.png", "case008.png", "case004.png", "case012.png"],
                     "val": ["case007.png"], "test": ["case005.png"]}


# ----------------------------------------------------------------------------- the module itself
def test_algorithms_share_one_signature_and_place_every_key_once():
    keys = [f"k{i}" for i in range(40)]
    strata = {k: i % 3 for i, k in enumerate(keys)}
    for algorithm, fractions in ((splits.stratified, (0.7, 0.15, 0.15)),
                                 (splits.stratified, (0.8, 0.2)),
                                 (splits.seeded_shuffle, (0.9, 0.1))):
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
