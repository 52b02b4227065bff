"""EchoCare-CLIP's evaluation as its authors ran it, where clip_us departs only behind a flag:
held-out data sets named as in their training_experiments/config.json (and said, never silent),
their in-distribution zero-shot prompt ("breast" for every organ, --prompt-organ breast),
all-images scoring (--split all, as they scored their liver set), the stable tie order
(--stable-ties), and BiomedCLIP evaluated end to end, text included (--weights <folder>)."""
import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import test_biomedclip
import test_evaluate
import torch
import torch.nn.functional as F

from clip_us import echocare, metrics
from clip_us.captions import manifest as M
from clip_us.evaluation.prompts import echocare_prompts

ROOT = Path(__file__).resolve().parents[1]
SMALL, run = test_evaluate.SMALL, test_evaluate.run
env, manifest = test_evaluate.env, test_evaluate.manifest  # fixtures: 40 phantom images
published = test_biomedclip.published  # fixture: a tiny random BiomedCLIP folder and open_clip's twin
AUTHORS_HELD_OUT = ["Dataset_BUSI_with_GT", "Liver_ultrasound"]  # config.json's held_out_datasets


def with_datasets(src, dst, name_of) -> Path:
    """A copy of manifest `src` (beside it: image paths are relative) whose dataset column is
    name_of(row index)."""
    rows = list(csv.DictReader(open(src)))
    with open(dst, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows([{**r, "dataset": name_of(i)} for i, r in enumerate(rows)])
    return Path(dst)


# ----------------------------------------------------------------------------- hold-out (item 6)
def test_recipe_holds_out_the_authors_data_sets_by_their_names():
    assert echocare.RECIPE["hold_out"].split(",") == AUTHORS_HELD_OUT
    hold, said = echocare.recipe_hold_out(echocare.RECIPE["hold_out"], {"Dataset_BUSI_with_GT", "BrEaST"})
    assert hold == ["Dataset_BUSI_with_GT"] and said == "held out (the authors' recipe): Dataset_BUSI_with_GT"
    hold, said = echocare.recipe_hold_out(echocare.RECIPE["hold_out"], {"phantom"})
    assert hold == [] and said.startswith("held out: nothing; the manifest has none of the recipe's "
                                          "Dataset_BUSI_with_GT, Liver_ultrasound (its data sets: phantom)")


def test_a_hold_out_matching_nothing_stops_and_the_recipe_says_what_it_held(tmp_path, manifest):
    pairs, _ = M.read_manifest(manifest)
    with pytest.raises(M.ManifestError, match=r"--hold-out \['busi'\]: no such dataset"):
        M.make_split(pairs, "70,15,15", 42, ["busi"])  # a user-given name that matches nothing
    busi = with_datasets(manifest, Path(manifest).parent / "busi_named.csv", lambda i: "Dataset_BUSI_with_GT" if i % 4 == 0 else "BrEaST")
    out = tmp_path / "run"
    environ = {**os.environ, "CLIP_US_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(ROOT / "train_contrastive.py"), "--model", "echocare",
                           "--manifest", str(busi), "--text-encoder", "bert", "--train", "heads",
                           "--arch", "tiny", "--weights", "none", "--image-size", "32", "--epochs", "1",
                           "--batch-size", "8", "--workers", "0", "--out-dir", str(out)],
                          env=environ, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "held out (the authors' recipe): Dataset_BUSI_with_GT" in proc.stdout
    split = json.loads((out / "split.json").read_text())
    assert len(split["held_out"]) == 10 and not set(split["held_out"]) & set(split["train"] + split["test"])


# ----------------------------------------------------------------------------- zero-shot prompt (item 7)
def test_prompt_organ_breast_is_the_authors_prompt_for_every_organ():
    ours = echocare_prompts(["breast", "thyroid"], ["benign", "malignant"])
    theirs = echocare_prompts(["breast", "thyroid"], ["benign", "malignant"], "breast")
    assert ours[1] == ["An ultrasound image of thyroid with benign findings.",
                       "An ultrasound image of thyroid with malignant findings."]
    assert theirs[0] == theirs[1] == ours[0]


# ----------------------------------------------------------------------------- --split all, ties (items 9, 4)
def test_split_all_scores_every_image_with_the_authors_prompt_and_stable_ties(tmp_path, manifest, env, capsys,
                                                                              one_thread):
    out = tmp_path / "eval"
    _, stdout, _ = run(["--manifest", manifest, "--weights", "none", "--split", "all", "--prompt-organ",
                        "breast", "--stable-ties", "--out-dir", out] + SMALL, env, capsys)
    assert "--split all: scoring alignment, retrieval and zero-shot on every image; skipping linear " \
           "probe, few-shot probe and end-to-end few-shot" in stdout
    res = json.loads(next(out.glob("*/results.json")).read_text())
    assert res["n_test"] == 40 and res["split"] == {"how": "all images", "train": 0, "val": 0, "test": 40}
    assert res["skipped"] == ["linear probe", "few-shot probe", "end-to-end few-shot"] and res["fewshot"] == {}
    assert "zs_acc" in res["metrics"] and not any(k.startswith("probe_") for k in res["metrics"])
    assert res["prompt"] == "An ultrasound image of breast with {label} findings."
    assert res["retrieval_ties"] == "stable" and res["config"]["stable_ties"]
    texts = torch.load(next(out.glob("*/features.pt")), weights_only=True)["texts"]
    assert "An ultrasound image of breast with normal findings." in texts
    assert not any("of thyroid" in t for t in texts)  # the thyroid images get breast prompts too
    assert not (out / "split.json").exists()
    code, _, err = run(["--manifest", manifest, "--weights", "none", "--split", "all", "--split-file",
                        out / "x.json", "--out-dir", tmp_path / "no"] + SMALL, env, capsys, check=False)
    assert code == 2 and "drop --split-file" in err


# ----------------------------------------------------------------------------- BiomedCLIP (item 8)
def test_biomedclip_folder_is_evaluated_text_included(tmp_path, manifest, env, capsys, one_thread,
                                                      published):
    """A tiny random BiomedCLIP folder laid out as published (tests/test_biomedclip.py's): the
    row's alignment equals open_clip's CustomTextCLIP's on the same test pairs."""
    folder, peer = published
    out = tmp_path / "eval"
    _, stdout, _ = run(["--manifest", manifest, "--weights", folder, "--out-dir", out, "--bootstrap", "0",
                        "--workers", "0", "--probe-fractions", "0.1", "--probe-seeds", "42",
                        "--e2e-fractions", "0.3", "--e2e-seeds", "42", "--e2e-epochs", "1"], env, capsys)
    res = json.loads((out / "biomedclip" / "results.json").read_text())
    assert res["row"] == "BiomedCLIP" and res["backbone"] == "biomedclip"
    assert res["details"]["e2e"]["lr"] == 5e-6 and res["details"]["e2e"]["heads_trainable"]
    from clip_us import load_biomedclip
    model, tokenizer = load_biomedclip(str(folder))
    test = set(json.loads((out / "split.json").read_text())["test"])
    pairs = [p for p in M.read_manifest(manifest)[0] if p.key in test]
    pixels = torch.stack([model.transform()(p.image) for p in pairs])
    with torch.no_grad():
        img = F.normalize(peer.encode_image(pixels), dim=-1)
        txt = F.normalize(peer.encode_text(tokenizer([p.caption for p in pairs])), dim=-1)
    want = metrics.alignment_scores(img, txt)
    assert res["metrics"]["paired"]["mean"] == pytest.approx(want["paired"], abs=1e-5)
    assert res["metrics"]["cross"]["mean"] == pytest.approx(want["cross"], abs=1e-5)
    assert np.isfinite(res["metrics"]["zs_acc"]["mean"])

