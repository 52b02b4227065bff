"""EchoCare-CLIP's evaluation protocol ("Ultrasound Vision-Language Alignment via Contrastive
Learning") on cached features: alignment, retrieval, zero-shot, linear probe, few-shot probe,
end-to-end few-shot, bootstrap CIs.

Every function takes features already computed by the frozen encoders (see models.py) and a
model's ``heads`` (``embed_image``, ``embed_text``, ``scale``); only the whole-model end-to-end
few-shot (ImageTask) runs the encoders, on the images:

- alignment: paired / cross / gap (metrics.alignment_scores), on (image, caption) pairs;
- retrieval: R@1/5/10 both ways and the mean rank, strict (row i ↔ column i, the authors'
  np.argsort(-sim, axis=1) on float32, or a stable sort with --stable-ties) and duplicate-aware
  (identical caption texts all count, stable order);
- zero-shot: "An ultrasound image of {organ} with {label} findings." per class, each image scored
  against its own organ's prompts with logits = scale · cos (scale = 1/τ capped at 100; 100 for
  OpenAI's CLIP), softmax, argmax;
- linear probe: StandardScaler + LogisticProbe, C from {0.01, 0.1, 1, 10} by validation weighted F1;
- few-shot probe: the same on 1/5/10 % of the training labels per class (ceil, at least 2);
- fits (Fit): one per organ, as the authors' run_per_organ_probe (organs in train, val and
  test; classes with >= 2 training rows), summarised across organs by the macro mean and the
  mean weighted by test count (across_organs); or one fit on all organs pooled;
- end-to-end few-shot: a deep copy of the whole model (ImageTask: both encoders, heads,
  temperature, the authors') or of the heads alone on cached features (FeatureTask) trains on
  scale · cos(image, class prompt) with cross-entropy; AdamW (weight decay 1e-4), clipping 1.0,
  batch 16, 4 epochs; the epoch with the best validation weighted F1 is kept;
- bootstrap: percentile CIs over the test images (1000 resamples, seeded; AUROC's resamples keep
  the class counts so it stays defined). The authors resample per-organ means, which is a single
  point when there is one organ.
"""
from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from .. import metrics
from ..precision import inference
from .probe import PROBE_CS, StandardScaler, select_C

CLS_METRICS = ("acc", "f1", "auroc")
alignment_and_retrieval = metrics.pair_scores  # its former name here (users' code imports it)


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


# ----------------------------------------------------------------------------- fits
@dataclass
class Fit:
    """The rows one probe or end-to-end run fits and is scored on: per split part the row indices
    into that part's arrays, their labels renumbered 0..K-1 over ``classes`` (the class indices
    kept, in order) and their organ index. One per organ (the authors' run_per_organ_probe) or
    one for every organ pooled."""
    name: str                  # the organ, or "all" when pooled
    classes: np.ndarray        # [K] class indices kept
    rows: dict                 # part -> [n] row indices
    y: dict                    # part -> [n] labels in 0..K-1
    organ: dict                # part -> [n] organ index

    def subset(self, train_rows) -> Fit:
        """The same fit on a subset of its training rows (few-shot), indices into rows["train"]."""
        pick = {"train": np.asarray(train_rows)}
        return Fit(self.name, self.classes,
                   *({s: (d[s][pick[s]] if s in pick else d[s]) for s in d} for d in (self.rows, self.y, self.organ)))


def fit_of(name: str, y: dict, organ: dict, keep: dict, classes) -> Fit:
    """A Fit of the rows `keep[part]` (boolean masks) with labels renumbered over `classes`."""
    classes = np.asarray(classes)
    rows = {s: np.flatnonzero(keep[s]) for s in keep}
    return Fit(name, classes, rows, {s: np.searchsorted(classes, y[s][rows[s]]) for s in rows},
               {s: organ[s][rows[s]] for s in rows})


def pooled_fit(y: dict, organ: dict, n_classes: int) -> Fit:
    """Every row and every class: one fit on all organs pooled (--fit pooled)."""
    return fit_of("all", y, organ, {s: np.ones(len(y[s]), bool) for s in y}, np.arange(n_classes))


def organ_fits(y: dict, organ: dict, organs: list) -> tuple[list, dict]:
    """([Fit per organ], {organ: why skipped}) as the authors' run_per_organ_probe: an organ is
    fitted when it has train, val and test rows; only its classes with at least 2 training rows
    are kept (rows of other classes leave all three parts), and at least 2 classes must remain."""
    fits, skipped = [], {}
    for i, name in enumerate(organs):
        mine = {s: organ[s] == i for s in y}
        if not all(mine[s].any() for s in y):
            skipped[name] = "not in every split part (train, val, test)"
            continue
        counts = np.bincount(y["train"][mine["train"]])
        classes = np.flatnonzero(counts >= 2)
        if len(classes) < 2:
            skipped[name] = f"fewer than 2 classes with >= 2 training rows ({counts.tolist()})"
            continue
        fits.append(fit_of(name, y, organ, {s: mine[s] & np.isin(y[s], classes) for s in y}, classes))
    return fits, skipped


def across_organs(reports: dict, n_test: dict) -> dict:
    """The authors' summarize_across_organs: {"macro": {metric: mean over organs}, "weighted":
    {metric: mean weighted by each organ's test count}} of {organ: report}; an organ whose value
    is None (AUROC with one test class) is left out of that metric's means."""
    out = {"macro": {}, "weighted": {}}
    for m in CLS_METRICS:
        vals = {o: r[m] for o, r in reports.items() if r.get(m) is not None}
        w = np.array([n_test[o] for o in vals], dtype=np.float64)
        v = np.array(list(vals.values()), dtype=np.float64)
        out["macro"][m] = float(v.mean()) if len(v) else None
        out["weighted"][m] = float((v * w).sum() / w.sum()) if len(v) else None
    return out


# ----------------------------------------------------------------------------- end-to-end few-shot
class FeatureTask:
    """End-to-end few-shot on cached features (--e2e heads, ours): only the heads and the
    temperature train; the encoders stay frozen. ``feats``: part -> [N, F]; ``prompt_feat``
    [O, C, F']: each organ's class prompts' text features."""
    mode, device = "heads", "cpu"

    def __init__(self, heads, feats: dict, prompt_feat: torch.Tensor, total_parameters: int):
        self.module, self.feats, self.prompt_feat = heads, feats, prompt_feat
        self.total_parameters = total_parameters

    def images(self, m, part: str, rows) -> torch.Tensor:
        return m.embed_image(self.feats[part][torch.as_tensor(rows)])

    def prompts(self, m) -> torch.Tensor:
        p = m.embed_text(self.prompt_feat.flatten(0, 1))  # [O·C, F'] -> [O·C, D]
        return p.view(*self.prompt_feat.shape[:2], -1)    # [O·C, D] -> [O, C, D]


class ImageTask:
    """The authors' end-to-end few-shot (--e2e whole): clone_model_for_fewshot deep-copies the
    whole model and AdamW(model.parameters()) trains both encoders, both heads and the
    temperature on the images, with the class prompts through the text tower at every step.
    ``whole``: evaluation.models' trainable model; ``paths``: part -> [N] image files."""
    mode = "whole"

    def __init__(self, whole, paths: dict, preprocess, prompt_texts: list, device,
                 precision: str = "fp32"):
        self.module, self.paths, self.preprocess = whole, paths, preprocess
        self.texts, self.device = prompt_texts, device
        self.precision = precision  # the validation and test passes: --precision, as resolved
        self.total_parameters = sum(p.numel() for p in whole.parameters())

    def scoring(self, m):
        """The context of a validation or test pass of the trained copy `m`."""
        return inference(m, self.precision, self.device)

    def images(self, m, part: str, rows) -> torch.Tensor:
        x = torch.stack([self.preprocess(self.paths[part][r]) for r in np.asarray(rows)])
        return m.embed_image(x.to(self.device))  # [B, 3, S, S] -> [B, D]

    def prompts(self, m) -> torch.Tensor:
        flat = [t for per_organ in self.texts for t in per_organ]
        return m.embed_text(flat).view(len(self.texts), len(self.texts[0]), -1)  # [O·C, D] -> [O, C, D]


def fit_logits(task, m, fit: Fit, part: str, idx, prompts=None) -> torch.Tensor:
    """[B, K] logits of the fit's rows `idx` (positions in fit.rows[part]) against their own
    organ's prompts of the fit's classes: scale · cos."""
    prompts = (task.prompts(m) if prompts is None else prompts)[:, torch.as_tensor(fit.classes)]  # [O, K, D]
    img = task.images(m, part, fit.rows[part][idx])
    organ = torch.as_tensor(fit.organ[part][idx]).to(prompts.device)
    return class_logits(img, prompts[organ].unsqueeze(2), m.scale())  # [B, K, 1, D] per image


def fit_probs(task, m, fit: Fit, part: str, chunk: int = 64) -> torch.Tensor:
    """[n, K] probabilities of every row of a part, in chunks, the model in eval mode."""
    m.eval()
    with task.scoring(m) if hasattr(task, "scoring") else torch.no_grad():
        prompts = task.prompts(m)
        return torch.cat([fit_logits(task, m, fit, part, idx, prompts).softmax(-1).cpu()
                          for idx in np.array_split(np.arange(len(fit.rows[part])),
                                                    max(1, -(-len(fit.rows[part]) // chunk)))]).float()


def train_step(task, m, fit: Fit, idx, opt, clip: float) -> float:
    """One AdamW step on a batch, the model in train mode (as the authors' loop); returns the loss."""
    m.train()
    with torch.enable_grad():  # also when the caller runs under no_grad
        y = torch.as_tensor(fit.y["train"][idx]).to(task.device)
        loss = F.cross_entropy(fit_logits(task, m, fit, "train", idx), y)
        opt.zero_grad()
        loss.backward()
    torch.nn.utils.clip_grad_norm_(m.parameters(), clip)
    opt.step()
    return loss.item()


def e2e_run(task, fit: Fit, lr: float, seed: int, epochs: int = 4, batch_size: int = 16,
            weight_decay: float = 1e-4, clip: float = 1.0, groups=None, bar=None) -> dict:
    """Train a copy of `task.module` on the fit's training rows with cross-entropy on scale · cos
    (image, class prompt); keep the epoch with the best validation weighted F1 (the first on a
    tie); report on its test rows, with every epoch's validation F1 and the fit's scope
    (trained_parameters, total_parameters: the whole model's)."""
    torch.manual_seed(seed)
    m = copy.deepcopy(task.module)
    for p in m.parameters():
        p.requires_grad_(True)
    opt = torch.optim.AdamW(m.parameters(), lr=lr, weight_decay=weight_decay)
    gen = torch.Generator().manual_seed(seed)
    best, curve = None, []
    for epoch in range(epochs):
        for idx in torch.randperm(len(fit.rows["train"]), generator=gen).split(batch_size):
            loss = train_step(task, m, fit, idx.numpy(), opt, clip)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.4f}")
        pred = fit_probs(task, m, fit, "val").argmax(1).numpy()
        curve.append(metrics.weighted_f1(pred, fit.y["val"]))
        if best is None or curve[-1] > max(curve[:-1]):
            best = (epoch + 1, copy.deepcopy(m.state_dict()))
    m.load_state_dict(best[1])
    probs = fit_probs(task, m, fit, "test").numpy()  # the best epoch's model
    return {**report_with_organs(probs, fit.y["test"], groups), "best_epoch": best[0],
            "val_f1": curve[best[0] - 1], "val_f1_per_epoch": curve,
            "trained_parameters": sum(p.numel() for p in m.parameters() if p.requires_grad),
            "total_parameters": task.total_parameters}


def e2e_fewshot(task, fit: Fit, fractions, seeds, lr, epochs, batch_size=16, groups=None,
                progress_bar=None) -> dict:
    """{fraction: [report per seed]}: a per-class fraction of the fit's training rows (ceil, at
    least 2 per class) trains a fresh copy; see e2e_run. ``progress_bar(total, desc)`` makes
    one bar per fit."""
    out = {}
    for f in fractions:
        out[f] = []
        for s in seeds:
            sub = fit.subset(metrics.fewshot_indices(fit.y["train"], f, seed=s))
            steps = epochs * -(-len(sub.rows["train"]) // batch_size)
            desc = f"end-to-end ({task.mode}) {fit.name} {f:g} seed {s}"
            with (progress_bar(steps, desc) if progress_bar else contextlib.nullcontext()) as bar:
                out[f].append(e2e_run(task, sub, lr, s, epochs, batch_size, groups=groups, bar=bar))
    return out


# ----------------------------------------------------------------------------- summaries and bootstrap
def fewshot_summary(runs: dict, prefix: str, organ: str | None = None) -> dict:
    """{prefix_metric: {fraction: {mean, std, per_seed}}} from {fraction: [report per seed]},
    over all test images or (``organ``) over that organ's."""
    pick = (lambda r: r["per_organ"][organ]) if organ else (lambda r: r)  # noqa: E731
    return {f"{prefix}_{m}": {f"{f:g}": metrics.seed_summary([pick(r)[m] for r in reps])
                              for f, reps in runs.items()} for m in CLS_METRICS}


def fewshot_across(runs: dict, n_test: dict, prefix: str, how: str) -> dict:
    """fewshot_summary's form across organs: {organ: {fraction: [report per seed]}} summarised
    per seed by across_organs (`how`: "macro" or "weighted"), then over the seeds."""
    organs = list(runs)
    first = runs[organs[0]]
    return {f"{prefix}_{m}": {f"{f:g}": metrics.seed_summary(
        [across_organs({o: runs[o][f][j] for o in organs}, n_test)[how][m] for j in range(len(reps))])
        for f, reps in first.items()} for m in CLS_METRICS}


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
