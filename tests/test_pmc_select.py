"""`python -m clip_us.captions pmc-ultrasound`: PMC-OA's ultrasound subset on a small synthetic
JSONL (images of several sizes, captions of several modalities, a missing and a corrupt image):
exactly the rows the rule names are kept, the rest counted by reason, and train_contrastive.py's
reader takes the manifest."""
import json

import pytest
from PIL import Image

from clip_us.captions import __main__ as cli
from clip_us.captions import pmc
from clip_us.captions.manifest import ManifestError, read_manifest

# (image, size or None (missing) or "corrupt", caption, expected reason)
ROWS = [
    ("us1.jpg", (300, 240), "Ultrasound image of the left breast showing a hypoechoic mass.", "kept"),
    ("us2.jpg", (256, 256), "Transverse SONOGRAPHIC view of the thyroid nodule.", "kept"),
    ("us3.png", (400, 224), "Color Doppler shows increased vascularity.", "kept"),
    ("us4.jpg", (512, 512), "Ultrasonography-guided biopsy of the liver lesion.", "kept"),
    ("us5.jpg", (320, 300), "Echocardiography: apical four-chamber view.", "kept"),
    ("us6.jpg", (320, 300), "Endoscopic ultrasound (EUS) of the pancreatic head.", "kept"),
    ("us7.jpg", (320, 300), "A B-mode sonogram of the kidney.", "kept"),
    ("us8.jpg", (320, 300), "US image of the gallbladder with stones.", "kept"),
    ("small.jpg", (300, 200), "Ultrasound of the carotid artery.", "too_small"),
    ("ct.jpg", (300, 300), "Axial CT scan of the abdomen showing a mass.", "no_term"),
    ("mri.jpg", (300, 300), "T2-weighted MRI of the brain.", "no_term"),
    ("xray.jpg", (300, 300), "Chest X-ray, posteroanterior view.", "no_term"),
    ("mixed.jpg", (300, 300), "CT and ultrasound images of the same liver lesion.", "excluded"),
    ("cells.jpg", (300, 300), "Cell cultures after ultrasound treatment for 10 min.", "excluded"),
    ("words.jpg", (300, 300), "Thrust of the museum's industrial collection.", "no_term"),
    ("gone.jpg", None, "Ultrasound of the spleen.", "missing_image"),
    ("bad.jpg", "corrupt", "Sonography of the appendix.", "unreadable"),
]


def make_pmc(root):
    (root / "images").mkdir()
    with open(root / "pmc_oa.jsonl", "w") as f:
        for i, (name, size, caption, _) in enumerate(ROWS):
            if size == "corrupt":
                (root / "images" / name).write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
            elif size is not None:
                Image.new("RGB", size, (i * 10, 80, 120)).save(root / "images" / name)
            f.write(json.dumps({"image": name, "caption": caption, "pmcid": f"PMC{i}"}) + "\n")
        f.write("\n")                                                # a blank line is skipped
    return root / "pmc_oa.jsonl"


def test_selection_keeps_what_the_rule_names_and_counts_the_rest(tmp_path, capsys):
    jsonl = make_pmc(tmp_path)
    out = tmp_path / "sel" / "pmc_us.csv"
    cli.main(["pmc-ultrasound", str(jsonl), "--out", str(out)])
    expected = [caption for _, _, caption, reason in ROWS if reason == "kept"]
    pairs, report = read_manifest(out)             # the reader train_contrastive.py uses
    assert [p.caption for p in pairs] == expected and report["kept"] == len(expected)
    assert {p.image.name for p in pairs} == {n for n, _, _, r in ROWS if r == "kept"}
    counts = json.loads((tmp_path / "sel" / "pmc_us.selection.json").read_text())
    want = {r: sum(row[3] == r for row in ROWS) for r in pmc.REASONS}
    assert counts["dropped"] == want and counts["kept"] == len(expected)
    assert counts["rows"] == len(ROWS) and counts["rule"]["min_side"] == 224
    assert counts["excluded_by"] == {pmc.EXCLUDED[0][0]: 1, pmc.EXCLUDED[-1][0]: 1}
    printed = capsys.readouterr().out
    assert f"kept {len(expected)} of {len(ROWS)} rows" in printed and "unreadable 1" in printed
    rows = [json.loads(x) for x in open(jsonl) if x.strip()]
    assert out.read_text().count("PMC") == len(expected) and rows[0]["pmcid"] == "PMC0"


def test_flags_move_the_rule(tmp_path):
    jsonl = make_pmc(tmp_path)
    s = pmc.select_ultrasound(jsonl, tmp_path / "a.jsonl", tmp_path / "images", min_side=200,
                              keep_mixed=True)
    assert s["dropped"]["too_small"] == 0 and s["dropped"]["excluded"] == 0
    assert s["kept"] == sum(r[3] in ("kept", "too_small", "excluded") for r in ROWS)
    assert (tmp_path / "a.selection.json").is_file()


@pytest.mark.parametrize("caption, term", [
    ("ULTRASOUND-guided drainage", "ultrasound"), ("sonographer's view", "sonograph*"),
    ("TRUS of the prostate", "EUS/TRUS/CEUS/POCUS/TVUS"), ("thrust", None), ("museum", None),
    ("an isoechoic nodule", "hypo/hyper/an/isoechoic"), ("US scans", "US image/scan"),
    ("focus on the bus", None)])
def test_terms_match_whole_words_in_any_case(caption, term):
    assert pmc.first_match(caption, pmc._TERMS) == term


def test_help_shows_the_rule_and_bad_input_says_what_to_do(tmp_path, capsys):
    with pytest.raises(SystemExit):
        cli.main(["pmc-ultrasound", "--help"])
    shown = " ".join(capsys.readouterr().out.split())
    assert all(name in shown for name, _ in pmc.TERMS + pmc.EXCLUDED) and "--min-side" in shown
    (tmp_path / "x.jsonl").write_text('{"image": "a.jpg", "caption": "ultrasound"}\nnot json\n')
    with pytest.raises(ManifestError, match="images"):
        pmc.select_ultrasound(tmp_path / "x.jsonl", tmp_path / "o.csv")
    (tmp_path / "images").mkdir()
    with pytest.raises(ManifestError, match=r"x.jsonl:2: not valid JSON"):
        pmc.select_ultrasound(tmp_path / "x.jsonl", tmp_path / "o.csv")
