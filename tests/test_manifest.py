"""Image–caption manifests: every format, every cleaning rule with its count, every bad row's
error, the splits and their reuse, and the writer's round trip."""
import json

import numpy as np
import pytest
from PIL import Image

from clip_us.captions import manifest as mf
from clip_us.captions import templates

LONG = "An oval hypoechoic breast lesion with circumscribed margins."  # > 20 characters


def png(path, value=100):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((8, 8), value, np.uint8)).save(path)
    return path


def write(path, text):
    path.write_text(text, encoding="utf-8")
    return path


def test_our_csv_with_fields_attributes_and_relative_paths(tmp_path):
    png(tmp_path / "img" / "a.png"), png(tmp_path / "img" / "b.png")
    m = write(tmp_path / "m.csv",
              'image,caption,organ,label,dataset,split,margin\n'
              f'img/a.png,"{LONG}, with a comma",breast,benign,busi,train,smooth\n'
              f'img/b.png,{LONG},thyroid,Malignant,tn3k,Validation,irregular\n')
    pairs, rep = mf.read_manifest(m)
    assert rep["format"] == "clip_us csv" and rep["kept"] == 2 and rep["rows"] == 2
    a, b = pairs
    assert a.image == tmp_path / "img" / "a.png" and a.key == "img/a.png" and a.row == 2
    assert a.caption == LONG + ", with a comma" and a.organ == "breast" and a.dataset == "busi"
    assert b.label == "Malignant" and b.split == "val" and b.attributes == {"margin": "irregular"}


def test_echocare_csv(tmp_path):
    png(tmp_path / "BUSI" / "benign (1).png")
    m = write(tmp_path / "captions.csv",
              f"image_path,text_caption,label\nBUSI/benign (1).png,{LONG},benign\n")
    (p,), rep = mf.read_manifest(m)
    assert rep["format"] == "echocare csv"
    assert (rep["image_col"], rep["caption_col"]) == ("image_path", "text_caption")
    assert p.label == "benign" and p.caption == LONG


def test_nextgen_csv_finds_images_by_name_in_the_sibling_images_folder(tmp_path):
    png(tmp_path / "images" / "0001.png")
    m = write(tmp_path / "pmc_curd_dataset.csv",
              f"Caption,filename\n{LONG},some/old/dir/0001.png\n")
    (p,), rep = mf.read_manifest(m)
    assert rep["format"] == "nextgen-uia csv" and p.image == tmp_path / "images" / "0001.png"
    assert p.key == "some/old/dir/0001.png"


def test_pmc_oa_jsonl_and_given_columns(tmp_path):
    png(tmp_path / "images" / "PMC1_fig.png")
    line = json.dumps({"image": "PMC1_fig.png", "caption": LONG})
    m = write(tmp_path / "pmc_oa.jsonl", line + "\n\n")
    (p,), rep = mf.read_manifest(m)
    assert rep["format"] == "pmc-oa jsonl" and p.caption == LONG
    m2 = write(tmp_path / "odd.csv", f"pic,words,note\nimages/PMC1_fig.png,{LONG},x\n")
    with pytest.raises(mf.ManifestError, match="--image-col"):
        mf.read_manifest(m2)
    (p2,), rep2 = mf.read_manifest(m2, image_col="pic", caption_col="WORDS")
    assert rep2["caption_col"] == "words" and p2.attributes == {"note": "x"}
    with pytest.raises(mf.ManifestError, match="no image column 'nope'"):
        mf.read_manifest(m2, image_col="nope", caption_col="words")


def test_cleaning_rules_and_their_counts(tmp_path):
    png(tmp_path / "a.png")
    rows = [LONG,                                     # kept by both
            "   exactly twenty ch   ",                # 20 after strip: dropped (must be > 20)
            "twenty-one characters",                  # 21: kept
            "",                                       # empty: dropped
            "甲状腺右叶可见一个低回声结节，边界清晰，形态规则。",     # mostly non-ASCII, 25 chars
            "Lesion ≤ 5 mm " + "回声" * 4 + " seen",  # long; ascii-only leaves 19 -> dropped by it
            ]
    m = write(tmp_path / "m.csv", "image,caption\n" + "".join(f'a.png,"{c}"\n' for c in rows))
    pairs, rep = mf.read_manifest(m, ascii_only=False)  # --no-ascii-only: every character kept
    assert [p.caption for p in pairs] == [LONG, "twenty-one characters", rows[4], rows[5].strip()]
    assert rep["dropped"] == {"short_caption": 2, "ascii_only": 0, "bad_image": 0}
    assert rep["mostly_non_ascii"] == 1 and "clip_us.captions refine" in mf.describe(rep)
    pairs, rep = mf.read_manifest(m)  # the default: the official whitelist first
    assert [p.caption for p in pairs] == [LONG, "twenty-one characters"]
    # The Chinese caption and the mixed one both fall to 20 characters or fewer only once the
    # non-whitelisted characters are gone; "≤" is on the official whitelist and stays.
    assert rep["dropped"] == {"short_caption": 2, "ascii_only": 2, "bad_image": 0}
    assert rep["ascii_changed"] == 2 and rep["mostly_non_ascii"] == 1
    cleaned = mf.clean_caption("Lesion ≤ 5 mm 回声 seen ", ascii_only=True)
    assert cleaned == "Lesion ≤ 5 mm  seen"
    assert "whitelist (--ascii-only) changed 2 captions and dropped 2" in mf.describe(rep)


def test_missing_image_names_the_row_and_file_and_skip_bad_counts(tmp_path):
    png(tmp_path / "a.png")
    m = write(tmp_path / "m.csv", f"image,caption\na.png,{LONG}\nmissing.png,{LONG}\n")
    with pytest.raises(mf.ManifestError,
                       match=r"m\.csv:3: image 'missing.png' not found.*--skip-bad"):
        mf.read_manifest(m)
    pairs, rep = mf.read_manifest(m, skip_bad=True)
    assert len(pairs) == 1 and rep["dropped"]["bad_image"] == 1 and "m.csv:3" in rep["bad_rows"][0]


def test_unreadable_image_and_empty_image_cell(tmp_path):
    png(tmp_path / "a.png")
    (tmp_path / "broken.png").write_bytes(png(tmp_path / "x.png").read_bytes()[:30])
    m = write(tmp_path / "m.csv", f"image,caption\nbroken.png,{LONG}\n,{LONG}\na.png,{LONG}\n")
    with pytest.raises(mf.ManifestError, match=r"m\.csv:2: image .*broken\.png cannot be read"):
        mf.read_manifest(m)
    _, rep = mf.read_manifest(m, skip_bad=True, check_images=False)
    assert rep["dropped"]["bad_image"] == 1 and "'image' column is empty" in rep["bad_rows"][0]
    pairs, rep = mf.read_manifest(m, skip_bad=True)
    assert [p.key for p in pairs] == ["a.png"] and rep["dropped"]["bad_image"] == 2
    assert "m.csv:3" in rep["bad_rows"][1]


def test_bad_jsonl_line_bad_split_value_and_missing_manifest(tmp_path):
    png(tmp_path / "a.png")
    m = write(tmp_path / "m.jsonl", json.dumps({"image": "a.png", "caption": LONG}) + "\n{oops\n")
    with pytest.raises(mf.ManifestError, match=r"m\.jsonl:2: not valid JSON"):
        mf.read_manifest(m)
    m2 = write(tmp_path / "m2.csv", f"image,caption,split\na.png,{LONG},holdout\n")
    with pytest.raises(mf.ManifestError, match=r"m2\.csv:2: split 'holdout'"):
        mf.read_manifest(m2)
    with pytest.raises(mf.ManifestError, match="nope.csv: file not found"):
        mf.read_manifest(tmp_path / "nope.csv")


def test_one_reader_serves_manifests_and_the_captions_command(tmp_path):
    png(tmp_path / "a.png")
    m = write(tmp_path / "m.csv", f"file,caption\na.png,{LONG}\n")  # a metadata-style image column
    (p,), rep = mf.read_manifest(m)
    assert rep["image_col"] == "file" and p.image == tmp_path / "a.png"
    assert (templates.read_rows, templates.pick_column, templates.IMAGE_COLS, templates.CAPTION_COLS) \
        == (mf.read_rows, mf.pick_column, mf.IMAGE_COLS, mf.CAPTION_COLS)
    assert templates.CaptionError is mf.ManifestError
    columns, rows, lines = mf.read_rows(write(tmp_path / "q.csv", 'image,caption\na,"two\nlines"\nb,c\n'))
    assert columns == ["image", "caption"] and [r["image"] for r in rows] == ["a", "b"] and lines == [3, 4]


def pairs_of(n, datasets=("a",), split=""):
    return [mf.Pair(key=f"{i}.png", image=None, caption=LONG, row=i + 2,
                    dataset=datasets[i % len(datasets)], split=split) for i in range(n)]


def test_default_split_is_the_official_seeded_90_10_shuffle():
    pairs = pairs_of(50)
    s = mf.make_split(pairs, "90,10", seed=1)
    order = [f"{i}.png" for i in np.random.RandomState(1).permutation(50)]  # pandas' sample order
    assert s["train"] == order[:45] and s["val"] == order[45:] and s["test"] == []
    assert mf.make_split(pairs, "90,10", seed=1) == s and mf.make_split(pairs, "90,10", seed=2) != s


def test_70_15_15_is_stratified_by_dataset_and_hold_out_keeps_data_sets_out():
    pairs = pairs_of(120, datasets=("busi", "thyroid", "liver"))
    s = mf.make_split(pairs, "70,15,15", seed=42, hold_out=["BUSI", "liver"])
    assert len(s["held_out"]) == 80 and all(int(k[:-4]) % 3 != 1 for k in s["held_out"])
    assert (len(s["train"]), len(s["val"]), len(s["test"])) == (28, 6, 6)
    assert all(int(k[:-4]) % 3 == 1 for part in ("train", "val", "test") for k in s[part])
    s2 = mf.make_split(pairs_of(200, datasets=("x", "y")), "70,15,15", seed=0)
    # scikit-learn's train_test_split twice: 30 test, then ceil(0.15 / 0.85 * 170) = 31 val
    for part, n in (("train", [69, 70]), ("val", [16, 15]), ("test", [15, 15])):
        per = [sum(int(k[:-4]) % 2 == d for k in s2[part]) for d in (0, 1)]
        assert per == n
    with pytest.raises(mf.ManifestError, match="no such dataset"):
        mf.make_split(pairs, hold_out=["nope"])
    with pytest.raises(mf.ManifestError, match="train,val"):
        mf.make_split(pairs, "100")


def test_split_column_wins_and_images_stay_in_one_split():
    pairs = pairs_of(4, split="train") + [mf.Pair("9.png", None, LONG, 9, split="test")]
    s = mf.make_split(pairs, "90,10")
    assert s["train"] == ["0.png", "1.png", "2.png", "3.png"] and s["test"] == ["9.png"]
    clash = pairs + [mf.Pair("0.png", None, LONG, 10, split="val")]
    with pytest.raises(mf.ManifestError, match="row 10: image 0.png is in both train and val"):
        mf.make_split(clash)
    with pytest.raises(mf.ManifestError, match="split column is empty"):
        mf.make_split(pairs + [mf.Pair("8.png", None, LONG, 11)])


def test_split_is_per_image_saved_and_reused(tmp_path):
    pairs = pairs_of(20) + [mf.Pair("3.png", None, "a second caption of image three", 30)]
    s = mf.make_split(pairs, "50,50", seed=0)
    assert len(s["train"]) + len(s["val"]) == 20  # images, not rows
    mf.save_split(tmp_path / "split.json", s, manifest="m.csv", seed=0)
    again = mf.load_split(tmp_path / "split.json", pairs)
    assert {k: again[k] for k in ("train", "val")} == {k: s[k] for k in ("train", "val")}
    parts = mf.split_pairs(pairs, again)
    three = "train" if "3.png" in s["train"] else "val"
    assert sum(p.key == "3.png" for p in parts[three]) == 2
    with pytest.raises(mf.ManifestError, match="1 images of the manifest are in no split"):
        mf.load_split(tmp_path / "split.json", pairs + [mf.Pair("new.png", None, LONG, 40)])
    fewer = mf.load_split(tmp_path / "split.json", pairs[:10])
    assert fewer["not_in_manifest"] == 10
    (tmp_path / "bad.json").write_text("[1, 2]")
    with pytest.raises(mf.ManifestError, match="not a split file"):
        mf.load_split(tmp_path / "bad.json", pairs)


def test_writer_round_trips_csv_and_jsonl(tmp_path):
    img = png(tmp_path / "data" / "a b.png")
    rows = [{"image": str(img), "caption": LONG + ', "quoted"', "organ": "breast",
             "label": "benign", "dataset": "phantom", "split": "train",
             "margin": "circumscribed", "size_mm": 12.5}]
    for name in ("out/m.csv", "out/m.jsonl"):
        path = mf.write_manifest(tmp_path / name, rows)
        (p,), rep = mf.read_manifest(path)
        assert p.image.resolve() == img.resolve() and p.key == "../data/a b.png"
        assert p.caption == rows[0]["caption"]
        assert (p.organ, p.label, p.split) == ("breast", "benign", "train")
        assert p.attributes == {"margin": "circumscribed", "size_mm": "12.5"}
    header = (tmp_path / "out/m.csv").read_text().splitlines()[0]
    assert header == "image,caption,organ,label,dataset,split,margin,size_mm"
    with pytest.raises(mf.ManifestError, match="needs 'image' and 'caption'"):
        mf.write_manifest(tmp_path / "x.csv", [{"image": "a.png"}])


# ----------------------------------------------------------------------------- several manifests
def two_releases(tmp_path):
    """MedPix-like (NextGen-UIA CSV) and PMC-CURD-like (ours) folders that both name their first
    image images/0001.png: different files, so different keys after the merge."""
    for name, value in (("medpix", 10), ("curd", 200)):
        for i in (1, 2, 3):
            png(tmp_path / name / "images" / f"000{i}.png", value + i)
    a = write(tmp_path / "medpix" / "medpix_dataset.csv",
              f'Caption,filename\n"{LONG} (a1)",0001.png\ntoo short,0002.png\n'
              f'"{LONG} a2 ☺",0003.png\n')
    b = write(tmp_path / "curd" / "curd.csv",
              f"image,caption\nimages/0001.png,{LONG} b1\n"
              f"images/0002.png,乳腺低回声结节边界清楚形态规则，未见明显血流信号\n"  # > 20, all deleted
              f"images/0003.png,{LONG} b3\n")
    return a, b


def test_merge_concatenates_in_the_order_given_each_set_cleaned_alike(tmp_path):
    # the official src/datasets/finetune.py: pd.concat([medpix, pmc_curd]), one cleaning pass
    # (whitelist, strip, > 20 characters) over every row, then one seeded shuffle of the whole
    a, b = two_releases(tmp_path)
    pairs, rep = mf.merge_manifests([a, b])
    assert [(p.caption, p.row) for p in pairs] == [
        (f"{LONG} (a1)", 2), (f"{LONG} a2", 4), (f"{LONG} b1", 2), (f"{LONG} b3", 4)]
    assert [p.key for p in pairs] == ["medpix/images/0001.png", "medpix/images/0003.png",
                                      "curd/images/0001.png", "curd/images/0003.png"]
    assert (rep["rows"], rep["kept"]) == (6, 4) and rep["format"] == "nextgen-uia csv + clip_us csv"
    assert rep["dropped"] == {"short_caption": 1, "ascii_only": 1, "bad_image": 0}
    assert rep["manifests"] == [{"path": str(a), "rows": 3, "n_kept": 2},
                                {"path": str(b), "rows": 3, "n_kept": 2}]
    assert [r["kept"] for r in rep["sources"]] == [2, 2]
    assert "merged 2 manifests in the order given: 6 rows, 4 kept" in mf.describe(rep)
    s = mf.make_split(pairs, "50,50", seed=3)   # over the merged set: df.sample's order
    order = [pairs[i].key for i in np.random.RandomState(3).permutation(4)]
    assert s["train"] == order[:2] and s["val"] == order[2:]
    reversed_pairs, _ = mf.merge_manifests([b, a])
    assert [p.key for p in reversed_pairs] == [p.key for p in pairs[2:] + pairs[:2]]


def test_one_manifest_merges_to_itself_with_its_counts(tmp_path):
    a, _ = two_releases(tmp_path)
    pairs, rep = mf.merge_manifests([a])
    alone, alone_rep = mf.read_manifest(a)
    assert pairs == alone and [p.key for p in pairs] == ["0001.png", "0003.png"]
    assert rep == {**alone_rep, "manifests": [{"path": str(a), "rows": 3, "n_kept": 2}]}


def test_a_manifest_given_twice_or_an_image_two_manifests_share_is_refused(tmp_path):
    a, b = two_releases(tmp_path)
    again = tmp_path / "medpix" / ".." / "medpix" / "medpix_dataset.csv"
    with pytest.raises(mf.ManifestError, match=r"medpix_dataset.csv is given twice .*give each "
                                               r"manifest once"):
        mf.merge_manifests([a, b, again])
    for caption, same in ((f"{LONG} (a1)", "the same caption"), (f"{LONG} other", "different")):
        c = write(tmp_path / "c.csv", f'image,caption\nmedpix/images/0001.png,"{caption}"\n')
        with pytest.raises(mf.ManifestError, match=rf"{a}:2 and {c}:2 list the same image "
                                                   rf".*0001.png with {same}.*remove it from one"):
            mf.merge_manifests([a, c])
