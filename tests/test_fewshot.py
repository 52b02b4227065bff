"""Per-organ fits and the end-to-end few-shot (evaluate.py --fit, --e2e) against the authors'
definitions (echocare-clip-exp-organized-Apr25.ipynb: run_per_organ_probe,
summarize_across_organs, clone_model_for_fewshot), written out here."""
import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score, f1_score
from sklearn.preprocessing import StandardScaler

from clip_us.evaluation import protocol
from clip_us.evaluation.models import CLIPHeads, CLIPWhole, _identity_projections
from clip_us.tokenizer import tokenize
from clip_us.weights import build_clip

pytestmark = pytest.mark.usefixtures("one_thread")


def parts(seed=0):
    """Labels and organ indices of train/val/test: organ 0 has 3 classes (class 2 with one
    training row), organ 1 two classes, organ 2 no test rows."""
    rng = np.random.default_rng(seed)
    y = {"train": np.array([0] * 8 + [1] * 8 + [2] + [0] * 6 + [1] * 6 + [0, 1] * 3),
         "val": np.array([0, 1, 2, 0, 1] * 2 + [0, 1]), "test": np.array([0, 1, 2] * 4 + [0, 1] * 3)}
    organ = {"train": np.array([0] * 17 + [1] * 12 + [2] * 6), "val": np.array([0] * 5 + [1] * 5 + [2] * 2),
             "test": np.array([0] * 12 + [1] * 6)}
    x = {s: rng.normal(size=(len(y[s]), 6)) + y[s][:, None] for s in y}
    return x, y, organ


def test_organ_fits_keep_organs_in_every_part_and_classes_with_two_training_rows():
    _, y, organ = parts()
    fits, skipped = protocol.organ_fits(y, organ, ["breast", "liver", "thyroid"])
    assert [f.name for f in fits] == ["breast", "liver"] and "thyroid" in skipped
    breast = fits[0]
    assert breast.classes.tolist() == [0, 1]  # class 2 has one training row: out of all parts
    for s in y:
        assert (organ[s][breast.rows[s]] == 0).all() and (y[s][breast.rows[s]] != 2).all()
        assert breast.y[s].tolist() == y[s][breast.rows[s]].tolist()  # renumbered over [0, 1]
    pooled = protocol.pooled_fit(y, organ, 3)
    assert pooled.name == "all" and all(len(pooled.rows[s]) == len(y[s]) for s in y)


def test_per_organ_probe_and_aggregates_match_the_authors_definitions():
    x, y, organ = parts()
    fits, _ = protocol.organ_fits(y, organ, ["breast", "liver", "thyroid"])
    reports, n = {}, {}
    for fit in fits:
        r = {s: fit.rows[s] for s in y}
        probs, info = protocol.linear_probe(x["train"][r["train"]], fit.y["train"], x["val"][r["val"]],
                                            fit.y["val"], x["test"][r["test"]], len(fit.classes))
        reports[fit.name], n[fit.name] = protocol.classification_report(probs, fit.y["test"]), len(probs)
        # the authors: a StandardScaler and LogisticRegression per organ, C chosen by val F1
        sc = StandardScaler().fit(x["train"][r["train"]])
        ref = LogisticRegression(C=info["C"], class_weight="balanced", max_iter=3000).fit(
            sc.transform(x["train"][r["train"]]), fit.y["train"])
        pred = ref.predict(sc.transform(x["test"][r["test"]]))
        assert reports[fit.name]["acc"] == pytest.approx(accuracy_score(fit.y["test"], pred))
        assert reports[fit.name]["f1"] == pytest.approx(f1_score(fit.y["test"], pred, average="weighted"))
    agg = protocol.across_organs(reports, n)
    for m in ("acc", "f1", "auroc"):  # summarize_across_organs: mean, and weighted by test count
        vals = np.array([reports[o][m] for o in n])
        w = np.array([n[o] for o in n])
        assert agg["macro"][m] == pytest.approx(vals.mean())
        assert agg["weighted"][m] == pytest.approx((vals * w).sum() / w.sum())


def tiny_task(mode):
    torch.manual_seed(0)
    clip = build_clip("none", "tiny")
    size = clip.visual.input_resolution
    rng = torch.Generator().manual_seed(1)
    y = {"train": np.array([0, 1] * 4), "val": np.array([0, 1] * 2), "test": np.array([0, 1] * 2)}
    pixels = {s: list(torch.randn(len(y[s]), 3, size, size, generator=rng)) for s in y}
    organ = {s: np.zeros(len(y[s]), int) for s in y}
    fit = protocol.pooled_fit(y, organ, 2)
    prompts = [["an image with benign findings.", "an image with malignant findings."]]
    whole = CLIPWhole(clip)
    if mode == "whole":
        return protocol.ImageTask(whole, pixels, lambda t: t, prompts, "cpu"), fit, whole
    with torch.no_grad():
        feats = {s: torch.stack(pixels[s]) for s in y}
        heads = CLIPHeads(clip.visual.proj, clip.text_projection, clip.logit_scale)
        with _identity_projections(clip):
            feats = {s: clip.encode_image(feats[s]) for s in y}
            pf = clip.encode_text(tokenize(prompts[0], context_length=clip.context_length)).unsqueeze(0)
    total = sum(p.numel() for p in whole.parameters())
    return protocol.FeatureTask(heads, feats, pf, total), fit, heads


def changed_names(before: dict, after: dict) -> set:
    return {k for k in before if not torch.equal(before[k], after[k])}


def test_whole_model_e2e_trains_every_parameter_of_both_encoders(monkeypatch):
    task, fit, whole = tiny_task("whole")
    before = {k: v.clone() for k, v in whole.state_dict().items()}
    seen = {}
    real = protocol.e2e_run.__globals__["copy"].deepcopy

    def spy(obj, *a):  # keep the trained copy (clone_model_for_fewshot's deep copy) to inspect
        out = real(obj, *a)
        if obj is whole:
            seen["model"] = out
        return out
    monkeypatch.setattr(protocol.copy, "deepcopy", spy)
    rep = protocol.e2e_run(task, fit, lr=1e-2, seed=0, epochs=1, batch_size=4)
    assert rep["trained_parameters"] == rep["total_parameters"] == sum(p.numel() for p in whole.parameters())
    after = seen["model"].state_dict()
    moved = changed_names(before, after)
    assert any(k.startswith("clip.visual.transformer") for k in moved)  # image encoder
    assert any(k.startswith("clip.transformer") for k in moved)         # text encoder
    assert {"clip.visual.proj", "clip.text_projection", "clip.logit_scale"} <= moved
    assert changed_names(before, whole.state_dict()) == set()  # the original is untouched


def test_heads_only_e2e_trains_only_the_heads():
    task, fit, heads = tiny_task("heads")
    rep = protocol.e2e_run(task, fit, lr=1e-2, seed=0, epochs=1, batch_size=4)
    assert rep["trained_parameters"] == sum(p.numel() for p in heads.parameters()) < rep["total_parameters"]
    assert 1 <= rep["best_epoch"] <= 1 and set(rep) >= {"acc", "f1", "auroc", "val_f1_per_epoch"}
