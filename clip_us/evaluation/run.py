"""evaluate.py's steps, each with its inputs and outputs in its signature: the models its flags
name, the test data every model is scored on, the protocol's blocks and the table.

A block is a piece of a model's results.json, ``{"metrics": ..., "ci": ..., "per_organ": ...}``
(and ``fewshot``, ``details``); evaluate.py joins a model's blocks with ``merge``. Nothing here
reads the command line or writes a file.
"""
from __future__ import annotations

import csv
import dataclasses
import io
from dataclasses import dataclass

import numpy as np
import torch

from .. import metrics, tables
from ..weights import available_models
from .models import from_checkpoint, from_weights, is_biomedclip
from .prompts import echocare_prompts
from .protocol import (
    PROBE_CS,
    FeatureTask,
    ImageTask,
    across_organs,
    bootstrap_alignment,
    bootstrap_cls,
    classification_report,
    e2e_fewshot,
    fewshot_across,
    fewshot_probe,
    fewshot_summary,
    linear_probe,
    organ_fits,
    pooled_fit,
    progress,
    zeroshot_probs,
)

SKIPPED_WITHOUT_LABELS = ["zero-shot", "linear probe", "few-shot probe", "end-to-end few-shot"]
SKIPPED_ON_ALL_IMAGES = SKIPPED_WITHOUT_LABELS[1:]  # --split all: no training images to fit on


# ----------------------------------------------------------------------------- data and models
def organs_of(es) -> list:
    """The manifest's organs, sorted. A labelled manifest needs two classes and an organ for
    every image: zero-shot's prompts name both."""
    organs = sorted({es.organ[k] for k in es.keys})
    if es.label and len(es.classes) < 2:
        raise ValueError(f"the manifest (with --classes) has one class only, {es.classes}: "
                         f"zero-shot and the probes need at least two; drop --classes or use a "
                         f"manifest with more labels")
    if es.label and "" in organs:
        raise ValueError("some images have no organ (no organ column value): pass --organ "
                         "(e.g. breast)")
    return organs


def weights_to_load(weights: list, checkpoints: list, arch: str) -> list:
    """--weights; with no model flag at all, the published weights of --arch (tiny has none:
    it is for tests, with random weights)."""
    if weights or checkpoints:
        return weights
    if arch not in available_models():
        raise ValueError(f"--arch {arch} has no published weights: add --weights none for "
                         f"random weights, or --weights NAME|FILE (names: {available_models()})")
    return [arch]


def load_models(checkpoints: list, weights: list, names: list, arch: str, image_size: int,
                clip_norm: bool, device, precision: str) -> list:
    """The models under evaluation, checkpoints first, then weights; --name gives rows their
    names in that order (the rest keep their own)."""
    if len(names) > len(checkpoints) + len(weights):  # before any model loads
        raise ValueError(f"--name: {len(names)} names for {len(checkpoints) + len(weights)} models")
    name = iter(names)
    models = [from_checkpoint(p, device, next(name, ""), precision) for p in checkpoints]
    models += [from_weights(w, arch, image_size, device, next(name, ""), clip_norm, precision)
               for w in weights]
    if len({m.name for m in models}) < len(models):
        raise ValueError(f"--name: give each model its own name (rows: {[m.name for m in models]})")
    return models


def parts_needed(split: dict, labelled: bool) -> list:
    """The split parts the protocol uses (test only without labels), refused when (nearly)
    empty: alignment's cross score needs two test pairs, the probes train and val images."""
    need = [s for s in ("train", "val", "test") if labelled or s == "test"]
    if any(len(split[s]) < (2 if s == "test" else 1) for s in need):
        raise ValueError(f"a split part is (nearly) empty ({ {s: len(split[s]) for s in need} }); "
                         f"the protocol needs train and val images and at least 2 test images: "
                         f"use a larger manifest")
    return need


def unused_flags(cfg, weights: list, pairs: list) -> dict:
    """{flag: why} for flags given that nothing in this run uses (said, not silently ignored)."""
    defaults, why = type(cfg)(), ("applies to --weights CLIP models only; checkpoints and "
                                  "BiomedCLIP use their own")
    clips = [w for w in weights if not is_biomedclip(w)]
    out = {f"--{k.replace('_', '-')}": why for k in ("image_size", "clip_norm", "arch")
           if not clips and getattr(cfg, k) != getattr(defaults, k)}
    if cfg.organ and all(p.organ for p in pairs):
        out["--organ"] = "fills rows without an organ value, and every row of the manifest has one"
    return out


# ----------------------------------------------------------------------------- what is scored, how
@dataclass
class Settings:
    """The protocol's settings: evaluate.py's flags of the same names."""
    bootstrap: int
    seed: int
    probe_fractions: list
    probe_seeds: list
    e2e_fractions: list
    e2e_seeds: list
    e2e_epochs: int
    e2e_batch_size: int
    e2e_lr: float
    e2e: str = "whole"    # whole model (the authors') or heads on cached features
    fit: str = "organ"    # one fit per organ (the authors') or pooled

    @classmethod
    def of(cls, cfg) -> Settings:
        return cls(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(cls)})


@dataclass
class TestData:
    """What every model is scored on: the split, its labels and organs, the test pairs."""
    split: dict          # {train, val, test: [image keys]}
    label: dict          # image key -> class index ({} without labels)
    organ_index: dict    # image key -> index into the sorted organs
    n_classes: int
    pairs: list          # the test images' (image, caption) pairs, one per caption
    prompts: list        # [organ][class] -> the authors' zero-shot prompt
    pair_groups: dict    # organ -> its rows of `pairs` (alignment's cross score needs two)
    test_groups: dict    # organ -> its rows of split["test"]
    organs: list = dataclasses.field(default_factory=list)  # sorted: organ_index's names


def organ_rows(organ_of_row: list, organs: list, least: int) -> dict:
    """{organ: its row indices} for organs with at least `least` rows (an unknown organ "" has
    none), for the per-organ results."""
    organ_of_row = np.array(organ_of_row)
    return {o: np.flatnonzero(organ_of_row == o) for o in organs
            if o and (organ_of_row == o).sum() >= least}


def test_data(es, split: dict, organs: list, prompt_organ: str = "") -> TestData:
    """The TestData of an evaluation set (evaluation.data.EvalSet) and its split; the zero-shot
    prompts name each organ, or `prompt_organ` in all (--prompt-organ)."""
    test_keys = set(split["test"])
    pairs = [p for p in es.pairs if p.key in test_keys]  # one per caption of a test image
    prompts = echocare_prompts(organs, es.classes, prompt_organ)
    return TestData(split, es.label, {k: organs.index(es.organ[k]) for k in es.keys},
                    len(es.classes), pairs, prompts,
                    organ_rows([es.organ[p.key] for p in pairs], organs, least=2),
                    organ_rows([es.organ[k] for k in split["test"]], organs, least=1), organs)


def fits_for(test: TestData, how: str) -> tuple[list, dict]:
    """([protocol.Fit], {organ: why not fitted}) of the probes and end-to-end runs: one per
    organ (--fit organ, the authors' rules: protocol.organ_fits) or one pooled; refused when no
    organ can be fitted."""
    y = {s: np.array([test.label[k] for k in test.split[s]]) for s in ("train", "val", "test")}
    organ = {s: np.array([test.organ_index[k] for k in test.split[s]]) for s in y}
    if how == "pooled":
        return [pooled_fit(y, organ, test.n_classes)], {}
    fits, skipped = organ_fits(y, organ, test.organs)
    if not fits:
        raise ValueError(f"--fit organ: no organ can be fitted ({skipped}); use --fit pooled")
    return fits, skipped


def scoring_steps(test: TestData, bootstrap: int, labelled: bool, probes: bool = True,
                  fit: str = "pooled") -> int:
    """Steps of a model's scoring bar: bootstrapped metrics (3 per group) and probe fits."""
    boot = 3 if bootstrap else 0
    steps = boot * (1 + len(test.pair_groups))
    if labelled:  # zero-shot bootstrapped
        steps += boot * (1 + len(test.test_groups))
    if labelled and probes:  # the linear probe's fits, bootstrapped
        n = len(fits_for(test, fit)[0])
        steps += len(PROBE_CS) * n + boot * (1 + len(test.test_groups) if fit == "pooled" else n)
    return steps


def merge(*blocks: dict) -> dict:
    """Blocks of results.json joined: where two have a key whose values are both dicts (a
    per_organ organ, its metrics or ci), those are joined in turn; otherwise the later wins."""
    out = {}
    for block in blocks:
        for k, v in block.items():
            out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def metric(value) -> dict:
    """A single-run metric in the project's {mean, std, per_seed} form."""
    return metrics.seed_summary([value])


# ----------------------------------------------------------------------------- blocks
def alignment(heads, img_f: dict, txt_f: dict, test: TestData, bootstrap: int, seed: int,
              bar, stable_ties: bool = False) -> dict:
    """Alignment and retrieval on the test pairs, overall and per organ, with bootstrap CIs;
    strict_* in the authors' tie order, or the stable one (--stable-ties)."""
    with torch.no_grad():
        img = heads.embed_image(torch.stack([img_f[p.key] for p in test.pairs]))
        txt = heads.embed_text(torch.stack([txt_f[p.caption] for p in test.pairs]))
    captions = [p.caption for p in test.pairs]

    def block(rows):
        i, t = img[rows], txt[rows]
        found = metrics.pair_scores(i, t, [captions[r] for r in rows], stable_ties)
        ci = bootstrap_alignment(i, t, bootstrap, seed, bar) if bootstrap else {}
        return {"metrics": {k: metric(v) for k, v in found.items()}, "ci": ci}

    every = block(np.arange(len(captions)))
    return {**every, "per_organ": {o: {**block(rows), "n_pairs": len(rows)}
                                   for o, rows in test.pair_groups.items()}}


def scored(prefix: str, probs, y, groups: dict, bootstrap: int, seed: int, bar) -> dict:
    """acc / weighted F1 / AUROC of `probs` [N, C] against `y` [N], overall and per organ
    (`groups`), with bootstrap CIs; keys `prefix`_acc and so on."""
    def block(rows):
        p, t = probs[rows], y[rows]
        report = classification_report(p, t)
        boot = bootstrap_cls(p, t, bootstrap, seed, bar) if bootstrap else {}
        return {"metrics": {f"{prefix}_{k}": metric(v) for k, v in report.items()},
                "ci": {f"{prefix}_{k}": v for k, v in boot.items()}}

    return {**block(np.arange(len(y))),
            "per_organ": {o: {**block(rows), "n_test": len(rows)} for o, rows in groups.items()}}


def arrays(img_f: dict, test: TestData) -> dict:
    """{part: (features [N, F], labels [N], organ index [N])} of the split's three parts."""
    def part(keys):
        return (torch.stack([img_f[k] for k in keys]), torch.tensor([test.label[k] for k in keys]),
                torch.tensor([test.organ_index[k] for k in keys]))
    return {s: part(test.split[s]) for s in ("train", "val", "test")}


def prompt_features(txt_f: dict, test: TestData) -> torch.Tensor:
    """[O, C, F']: each organ's class prompts' text features."""
    return torch.stack([torch.stack([txt_f[t] for t in ps]) for ps in test.prompts])


def zero_shot(heads, img_f: dict, txt_f: dict, test: TestData, settings: Settings, bar) -> dict:
    """The zero-shot block alone, on the split's test part: every image with --split all (as
    the authors scored their liver set), where no training images are left for the probes."""
    keys = test.split["test"]
    organ = torch.tensor([test.organ_index[k] for k in keys])
    probs = zeroshot_probs(heads, torch.stack([img_f[k] for k in keys]),
                           prompt_features(txt_f, test), organ)
    y = np.array([test.label[k] for k in keys])
    return scored("zs", probs, y, test.test_groups, settings.bootstrap, settings.seed, bar)


def fit_arrays(emb: dict, fit) -> dict:
    """{part: the fit's rows of emb[part]}."""
    return {s: emb[s][fit.rows[s]] for s in fit.rows}


def probe_block(fits: list, emb: dict, test: TestData, settings: Settings, bar) -> tuple[dict, dict]:
    """(block, the probe's {C, val_f1} per fit) of the linear probe: pooled, scored overall and
    per organ; or per organ, each organ's own fit under its per_organ, and overall the macro
    mean across organs with both aggregates under "across_organs" (no overall CI: the authors'
    interval resamples per-organ means)."""
    boot, out, info, reports, n = (settings.bootstrap, settings.seed, bar), {}, {}, {}, {}
    for fit in fits:
        x = fit_arrays(emb, fit)
        probs, info[fit.name] = linear_probe(x["train"], fit.y["train"], x["val"], fit.y["val"],
                                             x["test"], len(fit.classes), bar=bar)
        if settings.fit == "pooled":
            return scored("probe", probs, fit.y["test"], test.test_groups, *boot), info
        one = scored("probe", probs, fit.y["test"], {}, *boot)
        out[fit.name] = {"metrics": one["metrics"], "ci": one["ci"]}
        reports[fit.name], n[fit.name] = classification_report(probs, fit.y["test"]), len(probs)
    agg = across_organs(reports, n)
    return {"metrics": {f"probe_{k}": metric(v) for k, v in agg["macro"].items()}, "per_organ": out,
            "across_organs": {"probe": agg, "n_test": n}}, info


def fewshot_inputs(emb: dict, fit) -> tuple:
    """x_train, y_train, x_val, y_val, x_test, y_test of a fit (fewshot_probe's arguments)."""
    x = fit_arrays(emb, fit)
    return x["train"], fit.y["train"], x["val"], fit.y["val"], x["test"], fit.y["test"]


def fewshot_probe_runs(name: str, fits: list, emb: dict, test: TestData, settings: Settings) -> dict:
    """{fit name: {fraction: [report per seed]}} of the few-shot linear probe."""
    total = len(settings.probe_fractions) * len(settings.probe_seeds) * len(fits)
    groups = test.test_groups if settings.fit == "pooled" else None
    with progress(total, f"few-shot probe ({name})") as bar:
        return {f.name: fewshot_probe(*fewshot_inputs(emb, f), settings.probe_fractions,
                                      settings.probe_seeds, len(f.classes), groups=groups, bar=bar)
                for f in fits}


def e2e_task(model, heads, parts: dict, prompt_f, paths: dict, test: TestData, mode: str):
    """What the end-to-end few-shot trains: the whole model on the images (ImageTask, the
    authors'), or the heads on cached features (FeatureTask, --e2e heads)."""
    if mode == "whole":
        if model.whole is None:
            raise ValueError(f"{model.name}: no trainable whole model; use --e2e heads")
        files = {s: [paths[k] for k in test.split[s]] for s in ("train", "val", "test")}
        return ImageTask(model.whole, files, model.preprocess, test.prompts, model.device,
                         model.identity["precision"])
    total = sum(p.numel() for p in (model.whole or heads).parameters())
    return FeatureTask(heads, {s: parts[s][0] for s in parts}, prompt_f, total)


def fewshot_e2e(task, fits: list, lr: float, test: TestData, settings: Settings) -> dict:
    """{fit name: {fraction: [report per seed]}} of the end-to-end few-shot, a bar per fit."""
    groups = test.test_groups if settings.fit == "pooled" else None
    return {f.name: e2e_fewshot(task, f, settings.e2e_fractions, settings.e2e_seeds, lr,
                                settings.e2e_epochs, settings.e2e_batch_size, groups=groups,
                                progress_bar=progress) for f in fits}


def fewshot_block(probe_runs: dict, e2e_runs: dict, test: TestData, how: str, n_test: dict) -> dict:
    """The few-shot summaries. Pooled: overall under "fewshot", each organ's under its
    per_organ. Per organ: each organ's own fits under its per_organ; overall the macro mean
    across organs, and both aggregates under across_organs.fewshot."""
    if how == "pooled":
        def summary(organ=None):
            return {**fewshot_summary(probe_runs["all"], "probe", organ),
                    **fewshot_summary(e2e_runs["all"], "e2e", organ)}
        return {"fewshot": summary(), "per_organ": {o: {"fewshot": summary(o)} for o in test.test_groups}}
    across = {h: {**fewshot_across(probe_runs, n_test, "probe", h), **fewshot_across(e2e_runs, n_test, "e2e", h)}
              for h in ("macro", "weighted")}
    per = {o: {"fewshot": {**fewshot_summary(probe_runs[o], "probe"), **fewshot_summary(e2e_runs[o], "e2e")}}
           for o in probe_runs}
    return {"fewshot": across["macro"], "per_organ": per, "across_organs": {"fewshot": across}}


def e2e_details(runs: dict, lr: float, task, settings: Settings, skipped: dict, model) -> dict:
    """details.e2e: the mode, the fits, the learning rate, the best epochs and each fit's scope
    (trained and total parameters), and the organs not fitted."""
    first = {name: next(iter(by_f.values()))[0] for name, by_f in runs.items()}
    return {"mode": task.mode, "fit": settings.fit, "lr": lr,
            "best_epoch": {n: {f"{f:g}": [r["best_epoch"] for r in reps] for f, reps in by_f.items()}
                           for n, by_f in runs.items()},
            "scope": {n: {k: r[k] for k in ("trained_parameters", "total_parameters")} for n, r in first.items()},
            "organs_not_fitted": skipped, "heads_trainable": model.source.get("heads_trainable", True)}


def classification(model, heads, img_f: dict, txt_f: dict, test: TestData, settings: Settings,
                   bar, paths: dict | None = None) -> dict:
    """The block of zero-shot, linear probe, few-shot probe and end-to-end few-shot, with
    "details": the probe's C and the end-to-end mode, learning rate, best epochs and scope.
    `paths`: image key -> file, for the whole-model end-to-end few-shot. The scoring `bar`
    closes before the few-shot stages, which have their own."""
    parts = arrays(img_f, test)
    prompt_f = prompt_features(txt_f, test)  # each organ's class prompts: [O, C, F']
    with torch.no_grad():
        emb = {s: heads.embed_image(parts[s][0]).double().numpy() for s in parts}
    zs = zeroshot_probs(heads, parts["test"][0], prompt_f, parts["test"][2])
    zs_block = scored("zs", zs, parts["test"][1].numpy(), test.test_groups, settings.bootstrap,
                      settings.seed, bar)
    fits, skipped = fits_for(test, settings.fit)
    probe, probe_info = probe_block(fits, emb, test, settings, bar)
    bar.close()
    probe_runs = fewshot_probe_runs(model.name, fits, emb, test, settings)
    lr = settings.e2e_lr or (5e-6 if model.vanilla else 1e-5)
    task = e2e_task(model, heads, parts, prompt_f, paths or {}, test, settings.e2e)
    e2e_runs = fewshot_e2e(task, fits, lr, test, settings)
    n_test = {f.name: len(f.rows["test"]) for f in fits}
    return merge(zs_block, probe, fewshot_block(probe_runs, e2e_runs, test, settings.fit, n_test),
                 {"details": {"probe": probe_info if settings.fit == "organ" else probe_info["all"],
                              "e2e": e2e_details(e2e_runs, lr, task, settings, skipped, model)}})


# ----------------------------------------------------------------------------- results
def summary_line(name: str, found: dict, labelled: bool) -> str:
    """A model's results in one console line."""
    line = (f"{name}: paired {found['paired']['mean']:.3f} cross {found['cross']['mean']:.3f} "
            f"gap {found['gap']['mean']:.3f}")
    if labelled:
        line += f"  zero-shot acc {found['zs_acc']['mean']:.3f}"
    if "probe_acc" in found:  # not with --split all
        line += f"  probe acc {found['probe_acc']['mean']:.3f}"
    return line


def table_csv(results: list) -> str:
    """table.csv: the header once, then one row per model (tables.row_csv)."""
    buf = io.StringIO()
    rows = [list(csv.reader(io.StringIO(tables.row_csv(r)))) for r in results]
    csv.writer(buf, lineterminator="\n").writerows([rows[0][0]] + [r[1] for r in rows])
    return buf.getvalue()
