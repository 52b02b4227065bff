"""evaluate.py (EchoCare-CLIP's protocol) on a small phantom caption manifest, the tiny architecture.

In-process: the model adapter (frozen features + heads give the model's own embeddings), a
checkpoint's trained heads, the feature cache, the split helpers. Then the script itself (through
runpy, so the runs share one import of torch), with its command line as a user types it: the
whole protocol with few seeds/epochs, a checkpoint's split.json reused, the overlap refusal, and a
manifest without labels. Last the protocol's pieces, the joining of results.json blocks and the
one results builder (clip_us.runs.make_results).
"""
import csv
import json
import os
import runpy
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import exit_status

from clip_us import phantom, splits
from clip_us.captions import phantom_manifest
from clip_us.evaluation import data as evaldata
from clip_us.evaluation import models as evalmodels

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["--arch", "tiny", "--image-size", "64", "--workers", "0", "--probe-fractions", "0.1",
         "--probe-seeds", "42", "--e2e-fractions", "0.3", "--e2e-seeds", "42", "--e2e-epochs", "1",
         "--bootstrap", "20"]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    return {"CLIP_US_CACHE": str(tmp_path_factory.mktemp("cache"))}


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    """40 phantom images, two organs, three classes (benign, malignant, normal)."""
    cfg = phantom.PhantomConfig(n=40, size=96, organs=("breast", "thyroid"), p_normal=0.2)
    return phantom_manifest(tmp_path_factory.mktemp("phantom"), cfg)


def run(args, env, capsys, check=True, script="evaluate.py"):
    """`python SCRIPT ARGS` as a user runs it, but in this process (runpy), so the runs share
    one import of torch and scipy; an error ends it as report_errors ends the process (one line,
    status 2; with --debug a traceback). Returns (exit code, stdout, stderr)."""
    old_argv, old_env = sys.argv, dict(os.environ)
    sys.argv = [str(ROOT / script), *map(str, args)]
    os.environ.update(env)
    try:
        code = exit_status(lambda: runpy.run_path(str(ROOT / script), run_name="__main__"))
    finally:
        sys.argv = old_argv
        os.environ.clear()
        os.environ.update(old_env)
    out, err = capsys.readouterr()
    if check and code:
        raise AssertionError(f"{script} failed ({code}):\n{out[-3000:]}\n{err[-3000:]}")
    return code, out, err


def tiny_clip():
    from clip_us.taskmodel import build_clip
    return build_clip("none", "tiny")


# ----------------------------------------------------------------------------- in-process
def test_clip_adapter_features_and_heads_give_the_models_embeddings(one_thread):
    model = tiny_clip()
    ev = evalmodels.clip_model(model, "x", "clip", True, None, {}, torch.device("cpu"))
    x = torch.randn(3, 3, 64, 64)
    texts = ["an ultrasound image of a benign lesion.", "a malignant mass in the breast."]
    with torch.no_grad():
        img = ev.heads.embed_image(ev.image_features(x))
        txt = ev.heads.embed_text(ev.text_features(texts))
        from clip_us.tokenizer import tokenize
        ref_img = F.normalize(model.encode_image(x), dim=-1)
        ref_txt = F.normalize(model.encode_text(tokenize(texts)), dim=-1)
    torch.testing.assert_close(img, ref_img, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(txt, ref_txt, atol=1e-5, rtol=1e-5)
    assert ev.image_features(x).shape == (3, model.visual.conv1.out_channels)  # pre-projection width
    assert ev.heads.scale().item() == pytest.approx(min(100.0, model.logit_scale.exp().item()))
    # the projections came back after the identity swap
    assert model.visual.proj.shape == (64, 64) and not torch.allclose(model.visual.proj, torch.eye(64))


def write_checkpoint(folder: Path, split: dict | None, temperature=0.0) -> Path:
    """A checkpoint as train_contrastive.py writes one (--train heads): the config it was built
    from and its trained tensors under OpenAI keys; split.json beside it."""
    model = tiny_clip()
    torch.manual_seed(1)
    trained = {"visual.proj": torch.randn_like(model.visual.proj), "text_projection":
               torch.randn_like(model.text_projection), "logit_scale": torch.tensor(3.0)}
    folder.mkdir(parents=True, exist_ok=True)
    ckpt = {"config": {"weights": "none", "arch": "tiny", "image_size": 64, "clip_norm": True,
                       "train": "heads", "temperature": temperature},
            "adapter_config": {"kind": "none"}, "adapter_state_dict": {}, "model_state_dict": trained}
    torch.save(ckpt, folder / "best.pt")
    if split is not None:
        (folder / "split.json").write_text(json.dumps(split))
    return folder / "best.pt"


def test_checkpoint_heads_split_and_fixed_temperature(tmp_path):
    path = write_checkpoint(tmp_path / "run", {"train": ["a.png"], "val": ["b.png"], "test": ["c.png"]})
    ev = evalmodels.from_checkpoint(str(path), torch.device("cpu"), name="ft")
    saved = torch.load(path, weights_only=True)["model_state_dict"]
    torch.testing.assert_close(ev.heads.visual_proj.data, saved["visual.proj"])
    torch.testing.assert_close(ev.heads.text_projection.data, saved["text_projection"])
    assert ev.heads.scale().item() == pytest.approx(np.exp(3.0), rel=1e-5)
    assert ev.trained_on == {"a.png", "b.png"} and ev.split_path.endswith("split.json")
    assert not ev.vanilla and ev.name == "ft"
    fixed = evalmodels.from_checkpoint(str(write_checkpoint(tmp_path / "t", None, temperature=0.07)),
                                       torch.device("cpu"))
    assert fixed.heads.scale().item() == pytest.approx(1 / 0.07, rel=1e-5) and fixed.split_path is None


def echocare_checkpoint(folder: Path) -> Path:
    """A tiny random EchoCare-CLIP dual encoder (CLIP text family), heads trained, saved."""
    from clip_us import echocare
    model = echocare.build("clip", arch="tiny", random_weights=True, image_size=64)
    echocare.set_trainable(model, "heads")
    with torch.no_grad():
        model.log_temperature.fill_(np.log(0.05))
    folder.mkdir(parents=True, exist_ok=True)
    echocare.save(model, folder / "best.pt", config={"arch": "tiny"})
    return folder / "best.pt"


def test_echocare_checkpoint_features_heads_and_transform(tmp_path, manifest, one_thread):
    from clip_us import echocare
    path = echocare_checkpoint(tmp_path / "ec")
    ev = evalmodels.from_checkpoint(str(path), torch.device("cpu"))
    model = echocare.load(path)
    assert ev.kind == "echocare" and ev.name == "EchoCare-CLIP (clip text, heads)" and not ev.vanilla
    assert ev.source["heads_trainable"] and ev.heads.scale().item() == pytest.approx(20.0, rel=1e-5)
    image = str(evaldata.load_eval_set(manifest).pairs[0].image)
    x = ev.preprocess(image).unsqueeze(0)
    assert x.shape == (1, 3, 64, 64)  # the model's own evaluation size and transform
    torch.testing.assert_close(x[0], model.eval_transform()(echocare_data_read(image)))
    texts = ["An ultrasound image of breast with benign findings.", "a second caption, longer."]
    with torch.no_grad():
        torch.testing.assert_close(ev.heads.embed_image(ev.image_features(x)), model.encode_image(x), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ev.heads.embed_text(ev.text_features(texts)), model.encode_text(texts),
                                   atol=1e-5, rtol=1e-5)
    trainable = {n for n, p in ev.heads.named_parameters()}
    assert trainable == {f"{h}.{i}.{w}" for h in ("image_head", "text_head") for i in (0, 2)
                         for w in ("weight", "bias")} | {"log_temperature"}


def echocare_data_read(path):
    from clip_us.echocare.data import read_rgb
    return read_rgb(path)


def test_feature_cache_computes_each_image_and_text_once(tmp_path, manifest, one_thread):
    ev = evalmodels.from_weights("none", "tiny", 64, torch.device("cpu"))
    calls = {"img": 0, "txt": 0}
    img_fn, txt_fn = ev.image_features, ev.text_features
    ev.image_features = lambda x: (calls.__setitem__("img", calls["img"] + len(x)), img_fn(x))[1]
    ev.text_features = lambda t: (calls.__setitem__("txt", calls["txt"] + len(t)), txt_fn(t))[1]
    es = evaldata.load_eval_set(manifest)
    paths = {p.key: str(p.image) for p in es.pairs}
    keys = es.keys[:6]
    img, txt = evalmodels.cached_features(ev, tmp_path / "f.pt", keys[:4], [paths[k] for k in keys[:4]], ["t1", "t2", "t1"])
    assert calls == {"img": 4, "txt": 2}
    img, txt = evalmodels.cached_features(ev, tmp_path / "f.pt", keys, [paths[k] for k in keys], ["t2", "t3"])
    assert calls == {"img": 6, "txt": 3}  # only the two new images and the new text
    assert set(img) == set(keys) and set(txt) == {"t1", "t2", "t3"}
    evalmodels.cached_features(ev, tmp_path / "f.pt", keys[:1], [paths[keys[1]]], [])
    assert calls["img"] == 7  # same key, another file (another manifest): encoded afresh
    ev.identity = {"other": 1}  # another model: the cache is not reused
    evalmodels.cached_features(ev, tmp_path / "f.pt", keys[:1], [paths[keys[0]]], [])
    assert calls["img"] == 8


def test_split_is_the_authors_by_dataset_and_classes(manifest):
    es = evaldata.load_eval_set(manifest)
    assert es.classes == ["benign", "malignant", "normal"]  # every label present, fixed order
    split, how, new = evaldata.choose_split(es, seed=42)
    assert new["seed"] == 42 and all(new[s] == split[s] for s in ("train", "val", "test"))  # to save
    assert sorted(k for s in ("train", "val", "test") for k in split[s]) == sorted(es.keys)
    # EchoCare-CLIP's split, stratified by data set only (tests/test_splits.py: = scikit-learn's):
    # 40 phantom images, one data set: ceil(0.15 * 40) = 6 test, ceil(0.15 / 0.85 * 34) = 6 val.
    assert [len(split[s]) for s in ("train", "val", "test")] == [28, 6, 6]
    assert split == splits.train_test_split_twice(es.keys, es.dataset, evaldata.FRACTIONS, 42)
    two = evaldata.load_eval_set(manifest, classes=["malignant", "benign"])
    assert two.classes == ["benign", "malignant"] and len(two.keys) < len(es.keys)
    with pytest.raises(ValueError, match="not in the manifest"):
        evaldata.load_eval_set(manifest, classes=["cyst"])


def test_saved_split_reused_only_for_the_same_images_and_seed(tmp_path, manifest):
    es = evaldata.load_eval_set(manifest)
    saved = tmp_path / "split.json"
    split, _, new = evaldata.choose_split(es, 42, saved=saved)
    saved.write_text(json.dumps(new))
    again, how, none = evaldata.choose_split(es, 42, saved=saved)
    assert again == split and how == f"reused {saved}" and none is None
    with pytest.raises(ValueError, match="made with --seed 42"):
        evaldata.choose_split(es, 43, saved=saved)  # --seed is not silently ignored
    with pytest.raises(ValueError, match="other images"):
        evaldata.choose_split(evaldata.load_eval_set(manifest, classes=["benign", "normal"]), 42, saved=saved)


# ----------------------------------------------------------------------------- end to end
def test_evaluate_tiny_model_writes_results_tables_and_figures(tmp_path, manifest, env, capsys, one_thread):
    out = tmp_path / "eval"
    echo = echocare_checkpoint(tmp_path / "ec")  # two models in one run: names go checkpoints first
    _, stdout, _ = run(["--manifest", manifest, "--weights", "none", "--checkpoint", echo, "--name", "echo",
                        "--name", "tiny random", "--out-dir", out] + SMALL, env, capsys)
    assert "RANDOM weights" in stdout and "echo: no split.json" in stdout  # overlap not checkable
    echo_res = json.loads((out / "echo" / "results.json").read_text())
    assert echo_res["backbone"] == "echocare" and echo_res["details"]["e2e"]["heads_trainable"]
    assert echo_res["overlap"] is None and echo_res["data"]["kept"] == 40
    assert echo_res["metrics"]["zs_acc"]["mean"] is not None
    res = json.loads((out / "tiny-random" / "results.json").read_text())
    assert res["task"] == "align" and res["row"] == "tiny random" and res["classes"] == ["benign", "malignant", "normal"]
    for k in ("paired", "cross", "gap", "strict_i2t_R@1", "dup_t2i_R@10", "strict_i2t_mean_rank",
              "zs_acc", "zs_f1", "zs_auroc", "probe_acc", "probe_f1", "probe_auroc"):
        assert set(res["metrics"][k]) == {"mean", "std", "per_seed"}, k
    for k in ("paired", "gap", "zs_acc", "zs_auroc"):
        assert res["ci"][k]["low"] <= res["metrics"][k]["mean"] <= res["ci"][k]["high"], k
    # per-organ fits (the default): overall = the macro mean across organs, both aggregates kept
    agg = res["across_organs"]["probe"]
    assert res["fit"] == "organ" and res["metrics"]["probe_f1"]["mean"] == pytest.approx(agg["macro"]["f1"])
    assert set(res["across_organs"]["n_test"]) == {"breast", "thyroid"} and "weighted" in agg
    scope = res["details"]["e2e"]["scope"]["breast"]  # the whole model trained, per organ
    assert res["details"]["e2e"]["mode"] == "whole" and scope["trained_parameters"] == scope["total_parameters"]
    assert res["metrics"]["gap"]["mean"] == pytest.approx(res["metrics"]["paired"]["mean"] - res["metrics"]["cross"]["mean"])
    assert res["metrics"]["dup_i2t_R@1"]["mean"] >= res["metrics"]["strict_i2t_R@1"]["mean"]
    assert set(res["per_organ"]) == {"breast", "thyroid"} and "zs_acc" in res["per_organ"]["breast"]["metrics"]
    breast = res["per_organ"]["breast"]  # per organ: the same blocks, CIs and few-shot included
    assert {"paired", "gap", "zs_acc", "probe_f1"} <= set(breast["ci"]) and breast["n_test"] > 0
    assert set(breast["fewshot"]) == set(res["fewshot"]) and set(breast["fewshot"]["e2e_acc"]) == {"0.3"}
    assert set(res["fewshot"]) == {f"{p}_{m}" for p in ("probe", "e2e") for m in ("acc", "f1", "auroc")}
    assert set(res["fewshot"]["probe_acc"]) == {"0.1"} and set(res["fewshot"]["e2e_f1"]) == {"0.3"}
    assert set(res["fewshot"]["e2e_acc"]["0.3"]) == {"mean", "std", "per_seed"}
    assert res["details"]["probe"]["breast"]["C"] in (0.01, 0.1, 1.0, 10.0) and res["details"]["e2e"]["lr"] == 5e-6
    assert res["split"]["test"] == res["n_test"] > 0 and res["config"]["e2e_epochs"] == 1
    from clip_us import tables
    md = tables.render(*tables.collect(out))
    assert "| tiny random | ours (captions-seed0-tiers0.2-0.3-0.5) |" in md  # 3 classes, as the paper's rows
    table = list(csv.reader((out / "table.csv").open()))
    assert table[0][:5] == ["dataset", "row", "paired", "cross", "gap"] and [r[1] for r in table[1:]] == ["echo", "tiny random"]
    assert (out / "tiny-random" / "row.csv").is_file() and (out / "tiny-random" / "features.pt").is_file()
    texts = torch.load(out / "tiny-random" / "features.pt", weights_only=True)["texts"]
    assert "An ultrasound image of thyroid with normal findings." in texts  # the authors' prompt, per organ
    for fig in ("alignment", "zs", "probe", "fewshot_probe", "fewshot_e2e"):
        ET.parse(out / f"{fig}.svg")  # well-formed SVG
    saved = json.loads((out / "split.json").read_text())
    assert sorted(saved["test"]) == sorted(json.loads((out / "split.json").read_text())["test"])


def test_contrastive_checkpoint_split_reused_and_overlap_refused(tmp_path, manifest, env, capsys, one_thread):
    train = tmp_path / "train"
    run(["--manifest", manifest, "--split", "70,15,15", "--train", "heads", "--arch", "tiny", "--weights", "none",
         "--image-size", "64", "--epochs", "1", "--batch-size", "8", "--workers", "0", "--out-dir", train],
        env, capsys, script="train_contrastive.py")
    split = json.loads((train / "split.json").read_text())
    out = tmp_path / "eval"
    _, stdout, _ = run(["--manifest", manifest, "--checkpoint", train / "best.pt", "--name", "ft", "--out-dir", out]
                       + SMALL, env, capsys)
    assert "checkpoint split" in stdout
    assert "warning: --image-size is not used" in stdout and "warning: --arch is not used" in stdout  # SMALL's
    res = json.loads((out / "ft" / "results.json").read_text())
    assert res["n_test"] == len(split["test"]) and res["overlap"] == 0 and "checkpoint split" in res["split"]["how"]
    assert res["split"]["train"] == len(split["train"]) and res["split"]["val"] == len(split["val"])
    assert res["details"]["e2e"]["lr"] == 1e-5 and res["init"] == str(train / "best.pt")  # a trained model
    assert not (out / "split.json").exists()  # nothing left to split afresh

    bad = tmp_path / "bad_split.json"  # test on 3 of the checkpoint's training images
    bad.write_text(json.dumps({"train": split["train"][3:] + split["test"], "val": split["val"],
                               "test": split["train"][:3]}))
    code, _, stderr = run(["--manifest", manifest, "--checkpoint", train / "best.pt", "--split-file", bad,
                           "--out-dir", tmp_path / "refused"] + SMALL, env, capsys, check=False)
    assert code == 2 and "--allow-overlap" in stderr and not (tmp_path / "refused").exists()
    assert "{'CLIP (heads, ft.)': 3}" in stderr  # which model (row name from its config), how many images
    run(["--manifest", manifest, "--checkpoint", train / "best.pt", "--split-file", bad, "--allow-overlap",
         "--out-dir", tmp_path / "allowed"] + SMALL[:-1] + ["0"], env, capsys)  # --bootstrap 0
    res = json.loads((tmp_path / "allowed" / "clip-heads-ft" / "results.json").read_text())
    assert res["overlap"] == 3 and res["ci"] == {} and res["split"]["how"] == f"--split-file {bad}"


def test_manifest_without_labels_gives_alignment_and_retrieval_only(tmp_path, manifest, env, capsys, one_thread):
    rows = list(csv.DictReader(open(manifest)))
    plain = Path(manifest).parent / "plain.csv"
    with open(plain, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image", "caption"])
        w.writerows([[r["image"], r["caption"]] for r in rows])
    out = tmp_path / "eval"
    _, stdout, _ = run(["--manifest", plain, "--weights", "none", "--out-dir", out] + SMALL, env, capsys)
    assert "skipping zero-shot, linear probe, few-shot probe and end-to-end few-shot" in stdout
    res = json.loads(next(out.glob("*/results.json")).read_text())
    assert {"paired", "cross", "gap", "strict_i2t_R@1", "dup_i2t_R@1"} <= set(res["metrics"])
    assert not any(k.startswith(("zs_", "probe_")) for k in res["metrics"]) and res["fewshot"] == {}
    assert res["skipped"] == ["zero-shot", "linear probe", "few-shot probe", "end-to-end few-shot"]
    assert (out / "alignment.svg").is_file() and not (out / "zs.svg").exists()


def test_one_class_is_refused_without_traceback(tmp_path, manifest, env, capsys):
    code, _, stderr = run(["--manifest", manifest, "--classes", "benign", "--weights", "none",
                           "--out-dir", tmp_path / "one"] + SMALL, env, capsys, check=False)
    assert code == 2 and "one class only" in stderr and "Traceback" not in stderr
    assert not (tmp_path / "one").exists()  # a refused run leaves no folder


@pytest.mark.parametrize("bad", [["--probe-fractions", "0.1", "0"], ["--e2e-epochs", "0"], ["--bootstrap", "-1"],
                                 ["--image-size", "8"], ["--device", "bogus"], ["--arch", "bogus"]])
def test_bad_flags_refused_in_one_line(tmp_path, manifest, env, capsys, bad):
    code, _, stderr = run(["--manifest", manifest, "--weights", "none", "--out-dir", tmp_path / "x"] + SMALL + bad,
                          env, capsys, check=False)
    assert code == 2 and "Traceback" not in stderr and not (tmp_path / "x").exists()
    assert bad[0] in stderr or "error: unknown architecture 'bogus'" in stderr  # the flag, or its value


def test_debug_shows_the_traceback_of_a_user_error(tmp_path, env, capsys):
    args = ["--manifest", tmp_path / "missing.csv", "--weights", "none", "--out-dir", tmp_path / "x"] + SMALL
    code, _, stderr = run(args, env, capsys, check=False)
    assert code == 2 and "Traceback" not in stderr and "missing.csv" in stderr
    assert [line for line in stderr.splitlines() if line.startswith("error:")] == stderr.splitlines()[:1]
    code, _, stderr = run(args + ["--debug"], env, capsys, check=False)
    assert code == 1 and "Traceback" in stderr and "missing.csv" in stderr and "load_eval_set" in stderr
    assert not (tmp_path / "x").exists()


def test_arch_without_published_weights_asks_for_weights_none(tmp_path, manifest, env, capsys):
    code, _, stderr = run(["--manifest", manifest, "--arch", "tiny", "--out-dir", tmp_path / "x"], env, capsys,
                          check=False)
    assert code == 2 and "add --weights none" in stderr and not (tmp_path / "x").exists()


def test_echocare_table_says_when_our_row_is_not_3_class():
    from clip_us import tables
    res = {"task": "align", "dataset": "busi", "row": "x", "metrics": {}, "n_test": 5}
    two = tables.render_echocare({("align", "busi", "x"): {**res, "classes": ["benign", "malignant"]}})
    three = tables.render_echocare({("align", "busi", "x"): {**res, "classes": ["benign", "malignant", "normal"]}})
    assert any("| ours (BUSI, 2 classes) |" in line for line in two)  # the paper's rows are 3-class
    assert any("| ours (BUSI) |" in line for line in three)


def test_help_says_every_label_is_a_class(env, capsys):
    code, stdout, _ = run(["--help"], env, capsys, check=False)
    assert code == 0 and "every label present in the manifest is a class" in " ".join(stdout.split())
    assert "binary" in stdout and "--allow-overlap" in stdout and "--e2e-epochs" in stdout
    flat = " ".join(stdout.split())  # the protocol's defaults, as the issue gives them
    for default in ("fractions of each class's training images (default: [0.01, 0.05, 0.1])",
                    "(default: [42, 43, 44, 45, 46])", "published settings) (default: [0.01, 0.05, 0.1])",
                    "(the authors': 42) (default: [42])", "(the authors': 4) (default: 4)", "batch (default: 16)",
                    "(default: whole)", "(default: organ)", "s / step", "estimate",
                    "no CIs) (default: 1000)", "0 = 1e-5 for trained models, 5e-6 for vanilla"):
        assert default in flat, default


def test_e2e_defaults_are_the_authors_published_settings():
    """The last lines of the authors' settings cell (echocare-clip-exp-organized-Apr25.ipynb):
    fractions 1/5/10 %, one seed (42), 4 epochs; batch 16; whole model, fitted per organ."""
    from clip_us.config import EvaluateConfig
    cfg = EvaluateConfig()
    assert (cfg.e2e_fractions, cfg.e2e_seeds, cfg.e2e_epochs, cfg.e2e_batch_size) == \
        ([0.01, 0.05, 0.1], [42], 4, 16)
    assert (cfg.e2e, cfg.fit, cfg.e2e_lr) == ("whole", "organ", 0.0)  # 0: the authors' 1e-5 / 5e-6


# ----------------------------------------------------------------------------- protocol pieces
def identity_heads(log_t=np.log(0.07)):
    return evalmodels.ModuleHeads(torch.nn.Identity(), torch.nn.Identity(), torch.tensor(log_t))


def test_class_logits_is_scale_times_cosine_averaged_over_prompts():
    """The scoring zeroshot.py and evaluate.py share (zeroshot.py: scale 100)."""
    from clip_us.evaluation.protocol import class_logits
    img, text = F.normalize(torch.randn(3, 8), dim=-1), F.normalize(torch.randn(2, 4, 8), dim=-1)
    ref = torch.tensor([[np.mean([100 * float(img[b] @ text[c, p]) for p in range(4)]) for c in range(2)]
                        for b in range(3)])
    torch.testing.assert_close(class_logits(img, text, 100), ref.float(), atol=1e-4, rtol=1e-5)
    per_image = text.unsqueeze(0).expand(3, -1, -1, -1)  # [C, P, D] -> [B, C, P, D]
    torch.testing.assert_close(class_logits(img, per_image, 100), class_logits(img, text, 100))


def test_zeroshot_uses_each_images_own_organ_prompts():
    prompts = F.normalize(torch.randn(2, 3, 16), dim=-1)  # [organs, classes, D]
    organ = torch.tensor([0, 1, 1, 0])
    cls = torch.tensor([2, 0, 1, 1])
    images = prompts[organ, cls] + 0.01 * torch.randn(4, 16)  # each image near its organ's prompt
    probs = __import__("clip_us.evaluation.protocol", fromlist=["x"]).zeroshot_probs(identity_heads(), images, prompts, organ)
    assert probs.shape == (4, 3) and np.allclose(probs.sum(1), 1)
    assert probs.argmax(1).tolist() == cls.tolist()
    # the scale is 1/τ (capped at 100): with τ = 0.07 the logits are cos/0.07
    img = F.normalize(images, dim=-1)
    ref = torch.softmax(torch.einsum("bd,bcd->bc", img, prompts[organ]) / 0.07, -1)
    np.testing.assert_allclose(probs, ref.numpy(), atol=1e-5)


def test_alignment_block_has_strict_and_duplicate_aware_retrieval():
    from clip_us import metrics
    from clip_us.evaluation import protocol
    torch.manual_seed(0)
    txt = F.normalize(torch.randn(6, 16), dim=-1)
    txt[1] = txt[0]  # captions 0 and 1 are the same text, so the same embedding
    img = F.normalize(txt + 0.05 * torch.randn(6, 16), dim=-1)
    img[0] = txt[0]  # text 1's best image is image 0: a strict miss, a duplicate-aware hit
    captions = ["a benign lesion.", "a benign lesion.", "b", "c", "d", "e"]
    block = protocol.alignment_and_retrieval(img, txt, captions)
    strict, dup = metrics.retrieval_ranked(img, txt), metrics.retrieval_ranked(img, txt, captions=captions)
    assert all(block[f"strict_{k}"] == v for k, v in strict.items())
    assert all(block[f"dup_{k}"] == v for k, v in dup.items())
    assert block["dup_t2i_R@1"] == 1.0 > block["strict_t2i_R@1"]
    assert {"paired", "cross", "gap", "strict_i2t_mean_rank", "dup_t2i_R@10"} <= set(block)


def test_bootstrap_cis_are_seeded():
    from clip_us.evaluation import protocol
    rng = np.random.default_rng(0)
    y, probs = np.arange(40) % 3, rng.dirichlet(np.ones(3), size=40)
    first = protocol.bootstrap_cls(probs, y, 200, seed=42)
    assert set(first) == {"acc", "f1", "auroc"} and all(v["low"] <= v["high"] for v in first.values())
    assert protocol.bootstrap_cls(probs, y, 200, seed=42) == first != protocol.bootstrap_cls(probs, y, 200, seed=7)


def test_linear_probe_keeps_every_class_column():
    from clip_us.evaluation import protocol
    rng = np.random.default_rng(0)
    y_tr, y_te = np.array([0, 1] * 10), np.array([0, 1, 2])
    x = lambda y: rng.normal(size=(len(y), 4)) + np.eye(4)[y] * 3  # noqa: E731
    probs, info = protocol.linear_probe(x(y_tr), y_tr, x(y_tr), y_tr, x(y_te), n_classes=3)
    assert probs.shape == (3, 3) and np.all(probs[:, 2] == 0) and info["C"] in protocol.PROBE_CS


def e2e_task(heads, train, val, test, prompts):
    """(FeatureTask, pooled Fit) of (features, labels, organ index) per part: --e2e heads."""
    from clip_us.evaluation import protocol
    parts = {"train": train, "val": val, "test": test}
    fit = protocol.pooled_fit({s: p[1].numpy() for s, p in parts.items()},
                              {s: p[2].numpy() for s, p in parts.items()}, prompts.shape[1])
    n = sum(p.numel() for p in heads.parameters())
    return protocol.FeatureTask(heads, {s: p[0] for s, p in parts.items()}, prompts, n), fit


def test_e2e_run_trains_a_copy_and_keeps_the_best_epoch():
    from clip_us.evaluation import protocol
    torch.manual_seed(0)
    prompts = F.normalize(torch.randn(1, 2, 8), dim=-1)  # [organ, class, D]

    def part(n):  # (features, labels, organ index): class y is the one-hot e_y plus noise
        y = torch.arange(n) % 2
        return torch.eye(8)[y] + 0.1 * torch.randn(n, 8), y, torch.zeros(n, dtype=torch.long)

    head = torch.nn.Linear(8, 8)
    with torch.no_grad():  # start wrong: e_0 -> class 1's prompt, e_1 -> class 0's
        head.weight.zero_(), head.bias.zero_()
        head.weight[:, 0], head.weight[:, 1] = prompts[0, 1], prompts[0, 0]
    heads = evalmodels.ModuleHeads(head, torch.nn.Identity(), torch.tensor(np.log(0.07)))
    test = part(16)
    assert (protocol.zeroshot_probs(heads, test[0], prompts, test[2]).argmax(1) == test[1].numpy()).mean() == 0
    before = {k: v.clone() for k, v in heads.state_dict().items()}
    train, val = part(32), part(16)
    task, fit = e2e_task(heads, train, val, test, prompts)
    rep = protocol.e2e_run(task, fit, lr=3e-2, seed=0, epochs=6)
    assert set(rep) == {"acc", "f1", "auroc", "best_epoch", "val_f1", "val_f1_per_epoch",
                        "trained_parameters", "total_parameters"}
    assert all(torch.equal(before[k], v) for k, v in heads.state_dict().items())  # a copy trained
    assert rep["acc"] >= 0.75 and rep["val_f1"] >= 0.75  # from 0: the heads learnt the classes
    curve = rep["val_f1_per_epoch"]  # here [0, 0, 0, 0.42, 1, 1]: the best epoch is not the last
    assert len(curve) == 6 and rep["best_epoch"] == 1 + int(np.argmax(curve)) < 6  # first best
    # the test figures are the best epoch's heads': the same run stopped at that epoch
    short = protocol.e2e_run(task, fit, lr=3e-2, seed=0, epochs=rep["best_epoch"])
    assert {k: short[k] for k in ("acc", "f1", "auroc")} == {k: rep[k] for k in ("acc", "f1", "auroc")}


def test_e2e_recipe_adamw_decay_clipping_and_batch(monkeypatch):
    """The authors' recipe: AdamW (weight decay 1e-4), gradient clipping 1.0, batch 16, the lr given."""
    from clip_us.evaluation import protocol
    seen = {"opt": [], "clip": [], "batch": []}
    adamw, clip_fn, logits = torch.optim.AdamW, torch.nn.utils.clip_grad_norm_, protocol.fit_logits
    monkeypatch.setattr(torch.optim, "AdamW", lambda params, **kw: seen["opt"].append(kw) or adamw(params, **kw))
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_",
                        lambda params, max_norm: seen["clip"].append(max_norm) or clip_fn(params, max_norm))
    monkeypatch.setattr(protocol, "fit_logits",
                        lambda t, m, f, part, idx, *a: seen["batch"].append(len(idx)) or logits(t, m, f, part, idx, *a))
    prompts = F.normalize(torch.randn(1, 2, 8), dim=-1)
    part = (torch.randn(40, 8), torch.arange(40) % 2, torch.zeros(40, dtype=torch.long))
    task, fit = e2e_task(identity_heads(), part, part, part, prompts)
    protocol.e2e_run(task, fit, lr=5e-6, seed=0, epochs=1)
    assert seen["opt"] == [{"lr": 5e-6, "weight_decay": 1e-4}] and set(seen["clip"]) == {1.0}
    assert seen["batch"][:3] == [16, 16, 8]  # then the validation and test passes, in chunks


# ----------------------------------------------------------------------------- results.json
def test_blocks_merge_per_organ_metrics_and_ci_without_mutation():
    from clip_us.evaluation.run import merge
    align = {"metrics": {"gap": 1}, "ci": {}, "per_organ": {"breast": {"metrics": {"gap": 1}, "n_pairs": 4}}}
    zs = {"metrics": {"zs_acc": 2}, "ci": {"zs_acc": 3},
          "per_organ": {"breast": {"metrics": {"zs_acc": 2}, "n_test": 3}, "liver": {"n_test": 1}}}
    joined = merge(align, zs, {"fewshot": {"e2e_acc": 5}})
    assert joined == {"metrics": {"gap": 1, "zs_acc": 2}, "ci": {"zs_acc": 3}, "fewshot": {"e2e_acc": 5},
                      "per_organ": {"breast": {"metrics": {"gap": 1, "zs_acc": 2}, "n_pairs": 4, "n_test": 3},
                                    "liver": {"n_test": 1}}}
    assert align["metrics"] == {"gap": 1} and "n_test" not in align["per_organ"]["breast"]  # inputs kept


def test_make_results_puts_the_shared_keys_first_in_one_order():
    from clip_us import __version__
    from clip_us.evaluation.run import Settings
    from clip_us.runs import RANDOM_WEIGHTS, make_results
    cfg = Settings(0, 42, [0.1], [42], [0.3], [42], 1, 16, 0.0)  # any config dataclass
    common = dict(script="x.py", task="cls", dataset="busi", row="r", backbone="clip", adapter="none",
                  seeds=[1], metrics={}, precision="fp32", data={"kept": 3}, config=cfg)
    res = make_results(**common, own=1, n_test=5, init=None)
    assert list(res) == ["script", "task", "dataset", "row", "backbone", "adapter", "init", "seeds", "metrics",
                         "n_test", "precision", "own", "data", "config", "argv", "version"]
    assert res["config"]["seed"] == 42 and res["version"] == __version__ and "warning" not in res
    assert make_results(**common, random_weights=True)["warning"] == RANDOM_WEIGHTS
