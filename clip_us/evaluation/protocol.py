"""EchoCare-CLIP's evaluation protocol ("Ultrasound Vision-Language Alignment via Contrastive
Learning") on cached features: alignment, retrieval, zero-shot, linear probe, few-shot probe,
end-to-end few-shot, bootstrap CIs.

Every function takes features already computed by the frozen encoders (see models.py) and a
model's ``heads`` (``embed_image``, ``embed_text``, ``scale``), so nothing here runs an encoder:

- alignment: paired / cross / gap (metrics.alignment_scores), on (image, caption) pairs;
- retrieval: R@1/5/10 both ways and the mean rank, strict (row i ↔ column i, stable argsort: the
  authors' ranking) and duplicate-aware (identical caption texts all count);
- zero-shot: "An ultrasound image of {organ} with {label} findings." per class, each image scored
  against its own organ's prompts with logits = scale · cos (scale = 1/τ capped at 100; 100 for
  OpenAI's CLIP), softmax, argmax;
- linear probe: StandardScaler + LogisticProbe, C from {0.01, 0.1, 1, 10} by validation weighted F1;
- few-shot probe: the same on 1/5/10 % of the training labels per class (ceil, at least 2);
- end-to-end few-shot: the heads and temperature train on scale · cos(image, class prompt) with
  cross-entropy; AdamW (weight decay 1e-4), clipping 1.0, batch 16, 8 epochs; the epoch with the
  best validation weighted F1 is kept;
- bootstrap: percentile CIs over the test images (1000 resamples, seeded; AUROC's resamples keep
  the class counts so it stays defined). The authors resample per-organ means, which is a single
  point when there is one organ.
"""
from __future__ import annotations

import contextlib
import copy

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from .. import metrics
from .probe import PROBE_CS, StandardScaler, select_C

CLS_METRICS = ("acc", "f1", "auroc")


# ----------------------------------------------------------------------------- alignment, retrieval
def alignment_and_retrieval(img: torch.Tensor, txt: torch.Tensor, captions) -> dict:
    """Paired/cross/gap plus strict_* and dup_* retrieval keys, on paired [N, D] embeddings."""
    out = metrics.alignment_scores(img, txt)
    out.update(metrics.strict_retrieval(img, txt))
    out.update(metrics.dup_retrieval(img, txt, captions))
    return out


# ----------------------------------------------------------------------------- classification scores
def class_logits(img: torch.Tensor, text: torch.Tensor, scale) -> torch.Tensor:
    """[B, C] logits: scale · cos(image, class prompt), averaged over a class's prompts.
    img [B, D] and text [C, P, D] (or [B, C, P, D] per image) are L2-normalised. zeroshot.py's
    scoring is the same with scale 100. Always fp32, also inside a bf16 autocast region: bf16
    would keep about 3 significant digits of 100 * cos before the softmax."""
    img, text = img.float(), text.float()
    with torch.autocast(img.device.type, enabled=False):
        if text.ndim == 3:
            return (scale * torch.einsum("bd,cpd->bcp", img, text)).mean(-1)
        return (scale * torch.einsum("bd,bcpd->bcp", img, text)).mean(-1)


def classification_report(probs, labels) -> dict:
    """acc, weighted F1 and AUROC (positive class for 2 classes, macro one-vs-rest above;
    None when the labels hold one class only)."""
    probs, labels = np.asarray(probs, dtype=np.float64), np.asarray(labels)
    pred = probs.argmax(1)
    auroc = metrics.multiclass_auroc(probs, labels) if len(np.unique(labels)) > 1 else None
    return {"acc": float(np.mean(pred == labels)), "f1": metrics.weighted_f1(pred, labels), "auroc": auroc}


def report_with_organs(probs, labels, groups=None) -> dict:
    """classification_report overall, plus "per_organ": {organ: report} when ``groups`` maps
    each organ to its rows of ``probs``/``labels`` (the protocol is per organ and overall)."""
    probs, labels = np.asarray(probs), np.asarray(labels)
    out = classification_report(probs, labels)
    if groups:
        out["per_organ"] = {o: classification_report(probs[i], labels[i]) for o, i in groups.items()}
    return out


def organ_logits(heads, img_feat, prompt_feat, organ_idx) -> torch.Tensor:
    """[N, C] logits of images against their own organ's class prompts, through the heads.
    prompt_feat [O, C, F'] holds each organ's class prompts' text features; organ_idx [N] picks
    an image's organ. Gradients flow when enabled (the end-to-end few-shot trains the heads)."""
    img = heads.embed_image(img_feat)
    prompts = heads.embed_text(prompt_feat.flatten(0, 1))  # [O·C, F'] -> [O·C, D]
    prompts = prompts.view(*prompt_feat.shape[:2], -1)  # [O·C, D] -> [O, C, D]
    # one prompt per class: [N, C, D] -> [N, C, 1, D], the per-image form of class_logits
    return class_logits(img, prompts[organ_idx].unsqueeze(2), heads.scale())


def zeroshot_probs(heads, img_feat, prompt_feat, organ_idx) -> np.ndarray:
    """[N, C] zero-shot probabilities: softmax of organ_logits."""
    with torch.no_grad():
        return organ_logits(heads, img_feat, prompt_feat, organ_idx).softmax(-1).numpy()


# ----------------------------------------------------------------------------- linear probe
def linear_probe(x_train, y_train, x_val, y_val, x_test, n_classes: int,
                 Cs=PROBE_CS, bar=None) -> tuple[np.ndarray, dict]:
    """Test probabilities of StandardScaler + LogisticProbe with C chosen on the validation rows
    by weighted F1; also {C, val_f1}. ``bar`` advances once per C fitted."""
    scaler = StandardScaler().fit(x_train)
    probe, C, scores = select_C(scaler.transform(x_train), y_train, scaler.transform(x_val), y_val, Cs,
                                bar=bar)
    probs = np.zeros((len(x_test), n_classes))
    # [N, K] over every class index; a class absent from the training rows gets probability 0
    probs[:, probe.classes_] = probe.predict_proba(scaler.transform(x_test))
    return probs, {"C": C, "val_f1": {str(c): s for c, s in scores.items()}}


def fewshot_probe(x_train, y_train, x_val, y_val, x_test, y_test, fractions, seeds, n_classes: int,
                  groups=None, bar=None) -> dict:
    """{fraction: [report per seed]} for the probe fitted on a per-class fraction of the
    training rows (ceil, at least 2 per class); reports per organ too (report_with_organs)."""
    out = {}
    for f in fractions:
        out[f] = []
        for s in seeds:
            idx = metrics.fewshot_indices(y_train, f, seed=s)
            probs, _ = linear_probe(x_train[idx], y_train[idx], x_val, y_val, x_test, n_classes)
            out[f].append(report_with_organs(probs, y_test, groups))
            if bar is not None:
                bar.update(1)
    return out


# ----------------------------------------------------------------------------- end-to-end few-shot
def e2e_run(heads0, train, val, test, prompt_feat, lr: float, seed: int, epochs: int = 8,
            batch_size: int = 16, weight_decay: float = 1e-4, clip: float = 1.0, groups=None,
            bar=None) -> dict:
    """Train a copy of the heads and temperature on `train` (features, labels, organ index);
    keep the epoch with the best validation weighted F1 (the first on a tie); report on `test`
    (overall and per organ: ``groups``), with the validation F1 of every epoch."""
    torch.manual_seed(seed)
    heads = copy.deepcopy(heads0).train()
    for p in heads.parameters():
        p.requires_grad_(True)
    opt = torch.optim.AdamW(heads.parameters(), lr=lr, weight_decay=weight_decay)
    gen = torch.Generator().manual_seed(seed)
    best, curve, x, y, o = None, [], *train
    for epoch in range(epochs):
        heads.train()
        for idx in torch.randperm(len(y), generator=gen).split(batch_size):
            with torch.enable_grad():  # also when the caller runs under no_grad
                loss = F.cross_entropy(organ_logits(heads, x[idx], prompt_feat, o[idx]), y[idx])
                opt.zero_grad()
                loss.backward()
            torch.nn.utils.clip_grad_norm_(heads.parameters(), clip)
            opt.step()
            if bar is not None:
                bar.set_postfix(loss=f"{loss.item():.4f}")
        heads.eval()  # validation and test without the heads' dropout, if they have any
        with torch.no_grad():
            pred = organ_logits(heads, val[0], prompt_feat, val[2]).argmax(1)
        curve.append(metrics.weighted_f1(pred.numpy(), val[1].numpy()))
        if best is None or curve[-1] > max(curve[:-1]):
            best = (epoch + 1, copy.deepcopy(heads.state_dict()))
        if bar is not None:
            bar.update(1)
    heads.load_state_dict(best[1])
    probs = zeroshot_probs(heads, test[0], prompt_feat, test[2])  # the best epoch's heads
    return {**report_with_organs(probs, test[1].numpy(), groups), "best_epoch": best[0],
            "val_f1": curve[best[0] - 1], "val_f1_per_epoch": curve}


def e2e_fewshot(heads, train, val, test, prompt_feat, fractions, seeds, lr, epochs, batch_size=16,
                groups=None, bar=None) -> dict:
    """{fraction: [report per seed]}: a per-class fraction of the training images (ceil, at
    least 2 per class) trains the heads; see e2e_run."""
    out = {}
    for f in fractions:
        out[f] = []
        for s in seeds:
            idx = torch.as_tensor(metrics.fewshot_indices(train[1].numpy(), f, seed=s))
            sub = tuple(t[idx] for t in train)
            out[f].append(e2e_run(heads, sub, val, test, prompt_feat, lr, s, epochs, batch_size,
                                  groups=groups, bar=bar))
    return out


# ----------------------------------------------------------------------------- summaries and bootstrap
def fewshot_summary(runs: dict, prefix: str, organ: str | None = None) -> dict:
    """{prefix_metric: {fraction: {mean, std, per_seed}}} from {fraction: [report per seed]},
    over all test images or (``organ``) over that organ's."""
    pick = (lambda r: r["per_organ"][organ]) if organ else (lambda r: r)  # noqa: E731
    return {f"{prefix}_{m}": {f"{f:g}": metrics.seed_summary([pick(r)[m] for r in reps])
                              for f, reps in runs.items()} for m in CLS_METRICS}


def bootstrap_cls(probs, labels, n: int, seed: int, bar=None) -> dict:
    """{acc, f1, auroc: {low, high}} over resampled test images. Accuracy and F1 resample the
    images freely; AUROC resamples within each class (class counts fixed), since a resample
    missing a class has no AUROC and dropping such resamples would bias the interval."""
    probs, labels = np.asarray(probs), np.asarray(labels)
    fns = {"acc": lambda p, y: np.mean(p.argmax(1) == y),
           "f1": lambda p, y: metrics.weighted_f1(p.argmax(1), y),
           "auroc": lambda p, y: metrics.multiclass_auroc(p, y)}
    out = {}
    for k, fn in fns.items():
        if bar is not None:
            bar.update(1)
        if k == "auroc" and len(np.unique(labels)) < 2:
            continue
        ci = metrics.bootstrap_ci(fn, probs, labels, n=n, seed=seed, strata=labels if k == "auroc" else None)
        out[k] = {"low": ci["low"], "high": ci["high"]}
    return out


def bootstrap_alignment(img, txt, n: int, seed: int, bar=None) -> dict:
    """{paired, cross, gap: {low, high}} over resampled (image, caption) pairs."""
    img, txt = np.asarray(img, dtype=np.float64), np.asarray(txt, dtype=np.float64)
    out = {}
    for k in ("paired", "cross", "gap"):
        if bar is not None:
            bar.update(1)
        ci = metrics.bootstrap_ci(lambda a, b: metrics.alignment_scores(a, b)[k], img, txt, n=n, seed=seed)
        out[k] = {"low": ci["low"], "high": ci["high"]}
    return out


def progress(total: int, desc: str):
    """A progress bar that clears itself when done (the results line follows it)."""
    return tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True)


@contextlib.contextmanager
def single_thread():
    """Probes and head training work on small matrices, where thread start-up costs more than
    it saves (several times slower with two threads on a busy 2-core CPU); restored after."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)
