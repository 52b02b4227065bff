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
import re
from dataclasses import dataclass

import numpy as np
import torch

from .. import metrics, tables
from ..weights import available_models
from . import protocol
from .models import from_checkpoint, from_weights
from .prompts import ECHOCARE_TEMPLATE

SKIPPED_WITHOUT_LABELS = ["zero-shot", "linear probe", "few-shot probe", "end-to-end few-shot"]


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
    defaults, why = type(cfg)(), "applies to --weights models only; checkpoints use their own"
    out = {f"--{k.replace('_', '-')}": why for k in ("image_size", "clip_norm", "arch")
           if not weights and getattr(cfg, k) != getattr(defaults, k)}
    if cfg.organ and all(p.organ for p in pairs):
        out["--organ"] = "fills rows without an organ value, and every row of the manifest has one"
    return out


def slug(name: str) -> str:
    """A model's folder name: its row name in lower case, runs of other characters as '-'."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "model"


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


def organ_rows(organ_of_row: list, organs: list, least: int) -> dict:
    """{organ: its row indices} for organs with at least `least` rows (an unknown organ "" has
    none), for the per-organ results."""
    organ_of_row = np.array(organ_of_row)
    return {o: np.flatnonzero(organ_of_row == o) for o in organs
            if o and (organ_of_row == o).sum() >= least}


def test_data(es, split: dict, organs: list) -> TestData:
    """The TestData of an evaluation set (evaluation.data.EvalSet) and its split."""
    test_keys = set(split["test"])
    pairs = [p for p in es.pairs if p.key in test_keys]  # one per caption of a test image
    prompts = [[ECHOCARE_TEMPLATE.format(organ=o, label=c) for c in es.classes] for o in organs]
    return TestData(split, es.label, {k: organs.index(es.organ[k]) for k in es.keys},
                    len(es.classes), pairs, prompts,
                    organ_rows([es.organ[p.key] for p in pairs], organs, least=2),
                    organ_rows([es.organ[k] for k in split["test"]], organs, least=1))


def scoring_steps(test: TestData, bootstrap: int, labelled: bool) -> int:
    """Steps of a model's scoring bar: bootstrapped metrics (3 per group) and probe fits."""
    boot = 3 if bootstrap else 0
    steps = boot * (1 + len(test.pair_groups))
    if labelled:  # zero-shot and linear probe bootstrapped, and the probe's fits
        steps += len(protocol.PROBE_CS) + 2 * boot * (1 + len(test.test_groups))
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
              bar) -> dict:
    """Alignment and retrieval on the test pairs, overall and per organ, with bootstrap CIs."""
    with torch.no_grad():
        img = heads.embed_image(torch.stack([img_f[p.key] for p in test.pairs]))
        txt = heads.embed_text(torch.stack([txt_f[p.caption] for p in test.pairs]))
    captions = [p.caption for p in test.pairs]

    def block(rows):
        i, t = img[rows], txt[rows]
        found = protocol.alignment_and_retrieval(i, t, [captions[r] for r in rows])
        ci = protocol.bootstrap_alignment(i, t, bootstrap, seed, bar) if bootstrap else {}
        return {"metrics": {k: metric(v) for k, v in found.items()}, "ci": ci}

    every = block(np.arange(len(captions)))
    return {**every, "per_organ": {o: {**block(rows), "n_pairs": len(rows)}
                                   for o, rows in test.pair_groups.items()}}


def scored(prefix: str, probs, y, groups: dict, bootstrap: int, seed: int, bar) -> dict:
    """acc / weighted F1 / AUROC of `probs` [N, C] against `y` [N], overall and per organ
    (`groups`), with bootstrap CIs; keys `prefix`_acc and so on."""
    def block(rows):
        p, t = probs[rows], y[rows]
        report = protocol.classification_report(p, t)
        boot = protocol.bootstrap_cls(p, t, bootstrap, seed, bar) if bootstrap else {}
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


def zero_shot_and_probe(heads, parts: dict, prompt_f, emb: dict, test: TestData,
                        settings: Settings, bar) -> tuple[dict, dict]:
    """(block, the probe's {C, val_f1}) of zero-shot and the linear probe (C by validation
    weighted F1)."""
    y_te = parts["test"][1].numpy()
    zs = protocol.zeroshot_probs(heads, parts["test"][0], prompt_f, parts["test"][2])
    boot = (settings.bootstrap, settings.seed, bar)
    zs_block = scored("zs", zs, y_te, test.test_groups, *boot)
    probs, probe_info = protocol.linear_probe(emb["train"], parts["train"][1].numpy(), emb["val"],
                                              parts["val"][1].numpy(), emb["test"], test.n_classes,
                                              bar=bar)
    return merge(zs_block, scored("probe", probs, y_te, test.test_groups, *boot)), probe_info


def fewshot_probe(name: str, parts: dict, emb: dict, test: TestData, settings: Settings) -> dict:
    """{fraction: [report per seed]} of the few-shot linear probe."""
    y = {s: parts[s][1].numpy() for s in parts}
    total = len(settings.probe_fractions) * len(settings.probe_seeds)
    with protocol.progress(total, f"few-shot probe ({name})") as bar:
        return protocol.fewshot_probe(emb["train"], y["train"], emb["val"], y["val"], emb["test"],
                                      y["test"], settings.probe_fractions, settings.probe_seeds,
                                      test.n_classes, groups=test.test_groups, bar=bar)


def fewshot_e2e(name: str, heads, parts: dict, prompt_f, lr: float, test: TestData,
                settings: Settings) -> dict:
    """{fraction: [report per seed]} of the end-to-end few-shot (heads and temperature train)."""
    total = len(settings.e2e_fractions) * len(settings.e2e_seeds) * settings.e2e_epochs
    with protocol.progress(total, f"end-to-end few-shot ({name})") as bar:
        return protocol.e2e_fewshot(heads, parts["train"], parts["val"], parts["test"], prompt_f,
                                    settings.e2e_fractions, settings.e2e_seeds, lr,
                                    settings.e2e_epochs, settings.e2e_batch_size,
                                    groups=test.test_groups, bar=bar)


def fewshot_block(probe_runs: dict, e2e_runs: dict, groups: dict) -> dict:
    """The few-shot summaries: overall under "fewshot", each organ's under its per_organ."""
    def summary(organ=None):
        return {**protocol.fewshot_summary(probe_runs, "probe", organ),
                **protocol.fewshot_summary(e2e_runs, "e2e", organ)}
    return {"fewshot": summary(), "per_organ": {o: {"fewshot": summary(o)} for o in groups}}


def classification(model, heads, img_f: dict, txt_f: dict, test: TestData, settings: Settings,
                   bar) -> dict:
    """The block of zero-shot, linear probe, few-shot probe and end-to-end few-shot, with
    "details": the probe's C and the end-to-end learning rate and best epochs. The scoring
    `bar` closes before the few-shot stages, which have their own."""
    parts = arrays(img_f, test)
    # each organ's class prompts: [O, C, F']
    prompt_f = torch.stack([torch.stack([txt_f[t] for t in ps]) for ps in test.prompts])
    with torch.no_grad():
        emb = {s: heads.embed_image(parts[s][0]).double().numpy() for s in parts}
    block, probe_info = zero_shot_and_probe(heads, parts, prompt_f, emb, test, settings, bar)
    bar.close()
    probe_runs = fewshot_probe(model.name, parts, emb, test, settings)
    lr = settings.e2e_lr or (5e-6 if model.vanilla else 1e-5)
    e2e_runs = fewshot_e2e(model.name, heads, parts, prompt_f, lr, test, settings)
    best = {f"{f:g}": [r["best_epoch"] for r in reps] for f, reps in e2e_runs.items()}
    e2e = {"lr": lr, "best_epoch": best,
           "heads_trainable": model.source.get("heads_trainable", True)}
    return merge(block, fewshot_block(probe_runs, e2e_runs, test.test_groups),
                 {"details": {"probe": probe_info, "e2e": e2e}})


# ----------------------------------------------------------------------------- results
def summary_line(name: str, found: dict, labelled: bool) -> str:
    """A model's results in one console line."""
    line = (f"{name}: paired {found['paired']['mean']:.3f} cross {found['cross']['mean']:.3f} "
            f"gap {found['gap']['mean']:.3f}")
    if labelled:
        line += (f"  zero-shot acc {found['zs_acc']['mean']:.3f}  "
                 f"probe acc {found['probe_acc']['mean']:.3f}")
    return line


def table_csv(results: list) -> str:
    """table.csv: the header once, then one row per model (tables.row_csv)."""
    buf = io.StringIO()
    rows = [list(csv.reader(io.StringIO(tables.row_csv(r)))) for r in results]
    csv.writer(buf, lineterminator="\n").writerows([rows[0][0]] + [r[1] for r in rows])
    return buf.getvalue()
