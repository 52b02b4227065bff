"""evaluate.py: EchoCare-CLIP's evaluation protocol, one table row per model.

Alignment (paired / cross / gap), retrieval (strict and duplicate-aware R@1/5/10 both ways, mean
rank), zero-shot ("An ultrasound image of {organ} with {label} findings."), linear probe, few-shot
probe (1/5/10 %), end-to-end few-shot (heads + temperature) and bootstrap 95 % CIs, per organ and
overall, for every model given (seed 000; protocol notes in docs/evaluation.md).

Classes: every label present in the manifest is a class (BUSI with `normal` is a 3-class task, as
in the authors' held-out results); --classes restricts them. This differs from train_cls.py and
zeroshot.py, whose binary benign/malignant default follows seed 003.

    python evaluate.py --manifest data/busi_captions.csv --organ breast --weights ViT-B/32
    python evaluate.py --manifest m.csv --checkpoint runs/train_contrastive/x/best.pt --name ft
    python evaluate.py --arch tiny --weights none --image-size 64   # phantom captions, random weights
"""
from __future__ import annotations

import csv
import dataclasses
import io
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

import clip_us
from clip_us import tables
from clip_us.config import parse_config
from clip_us.evaluation import data as evaldata
from clip_us.evaluation import models as evalmodels
from clip_us.evaluation import plots as evalplots
from clip_us.evaluation import protocol
from clip_us.evaluation.prompts import ECHOCARE_TEMPLATE
from clip_us.fileio import write_json, write_text
from clip_us.precision import resolve_precision
from clip_us.weights import available_models


@dataclass
class Config:
    manifest: str = field(default="", metadata={"help": "image-caption manifest (CSV/JSONL, any format "
                                                "train_contrastive.py reads); '' = the phantom's"})
    image_col: str = field(default="", metadata={"help": "the manifest's image column (default: detected)"})
    caption_col: str = field(default="", metadata={"help": "the manifest's caption column (default: detected)"})
    ascii_only: bool = field(default=False, metadata={"help": "drop captions that are not ASCII"})
    skip_bad: bool = field(default=False, metadata={"help": "skip unreadable or missing images (counted) "
                                                    "instead of stopping"})
    organ: str = field(default="", metadata={"help": "organ for rows without an organ column value"})
    classes: list = field(default_factory=list, metadata={
        "help": "restrict to these labels (default: every label present, e.g. 3 classes for BUSI "
                "with normal; train_cls.py/zeroshot.py default to benign/malignant)"})
    checkpoint: list = field(default_factory=list, metadata={"repeat": True, "help": "a "
                             "train_contrastive.py or EchoCare-CLIP checkpoint (repeatable)"})
    weights: list = field(default_factory=list, metadata={"repeat": True, "help": "vanilla CLIP: a "
                          "name, a file or none (repeatable); default ViT-B/16 when no model is given"})
    arch: str = field(default="ViT-B/16", metadata={"help": "architecture for --weights none (tiny, ...)"})
    name: list = field(default_factory=list, metadata={"repeat": True, "help": "row names, checkpoints "
                       "first, then weights (repeatable)"})
    image_size: int = field(default=224, metadata={"min": 16, "help": "input size for --weights models; "
                                                   "checkpoints use their own"})
    clip_norm: bool = field(default=True, metadata={"help": "CLIP's mean/std for --weights models "
                                                    "(--no-clip-norm: none); checkpoints use their own"})
    split_file: str = field(default="", metadata={"help": "split.json to evaluate on (its test part)"})
    allow_overlap: bool = field(default=False, metadata={"help": "evaluate even on images a model "
                                                         "trained on"})
    seed: int = field(default=42, metadata={"help": "split and bootstrap seed"})
    probe_fractions: list = field(default_factory=lambda: [0.01, 0.05, 0.10], metadata={
        "fraction": True, "help": "few-shot probe: fractions of each class's training images"})
    probe_seeds: list = field(default_factory=lambda: list(protocol.FEWSHOT_SEEDS), metadata={
        "help": "few-shot probe: one subset per seed"})
    e2e_fractions: list = field(default_factory=lambda: [0.005, 0.01, 0.02, 0.05, 0.10, 0.15, 0.20, 0.30],
                                metadata={"fraction": True, "help": "end-to-end few-shot: fractions of "
                                          "each class's training images"})
    e2e_seeds: list = field(default_factory=lambda: [42, 43, 44], metadata={
        "help": "end-to-end few-shot: one subset and batch order per seed"})
    e2e_epochs: int = field(default=8, metadata={"min": 1, "help": "end-to-end few-shot epochs"})
    e2e_batch_size: int = field(default=16, metadata={"min": 1, "help": "end-to-end few-shot batch"})
    e2e_lr: float = field(default=0.0, metadata={"min": 0, "help": "0 = 1e-5 for trained models, "
                                                 "5e-6 for vanilla"})
    bootstrap: int = field(default=1000, metadata={"min": 0, "help": "resamples (0 = no CIs)"})
    batch_size: int = field(default=32, metadata={"min": 1, "help": "images per batch when embedding"})
    workers: int = field(default=2, metadata={"min": 0, "help": "image-loading processes"})
    device: str = field(default="auto", metadata={"help": "auto (cuda when there is one), cpu, cuda, cuda:1"})
    precision: str = field(default="fp32", metadata={
        "choices": ["fp32", "bf16"], "help": "encoders: fp32, or bf16 (autocast on CUDA and on "
        "CPUs with native bf16; elsewhere fp32, with a message)"})
    out_dir: str = field(default="", metadata={"help": "output folder (default runs/evaluate/"
                                               "<manifest>-<time>); its split.json and features are reused"})


def parse_args(argv=None) -> Config:
    """The command line from Config (clip_us.config: every field a flag; "repeat" fields add up,
    --checkpoint a --checkpoint b). The epilog is the class rule and the examples."""
    return parse_config(Config, argv, description=__doc__.split("\n\n")[0],
                        epilog="\n\n".join(__doc__.split("\n\n")[2:4]))


def fail(message):
    """A user error: one line on stderr, exit status 2, no traceback."""
    if isinstance(message, KeyError) and message.args:
        message = message.args[0]  # str(KeyError) would print the message in quotes
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def resolve_device(name: str) -> torch.device:
    """--device: auto = cuda when there is one; a bad name or a missing GPU is a user error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        fail(f"--device {name}: not a device (cpu, cuda, cuda:1, ...)")
    if device.type == "cuda" and not torch.cuda.is_available():
        fail(f"--device {name}: this machine has no CUDA GPU; use --device cpu")
    return device


cfg = parse_args()
device = resolve_device(cfg.device)  # one process: no DDP here
precision = resolve_precision(cfg.precision, device)  # bf16 -> fp32 on CPUs without native bf16
torch.manual_seed(cfg.seed)

# ----------------------------------------------------------------------------- data and split
try:
    if not cfg.manifest:
        from clip_us import phantom
        cfg.manifest = str(phantom.caption_manifest())
    es = evaldata.load_eval_set(cfg.manifest, cfg.organ, cfg.classes, image_col=cfg.image_col or None,
                                caption_col=cfg.caption_col or None, ascii_only=cfg.ascii_only,
                                skip_bad=cfg.skip_bad)
except (ValueError, OSError) as e:
    fail(e)
labelled = bool(es.label)
if labelled and len(es.classes) < 2:
    fail(f"the manifest (with --classes) has one class only, {es.classes}: zero-shot and the probes "
         f"need at least two; drop --classes or use a manifest with more labels")
organs = sorted({es.organ[k] for k in es.keys})
if labelled and "" in organs:
    fail("some images have no organ (no organ column value): pass --organ (e.g. breast)")
stamp = time.strftime("%Y%m%d-%H%M%S")
out = Path(cfg.out_dir or Path("runs") / "evaluate" / f"{Path(cfg.manifest).stem}-{stamp}")
print(f"evaluate.py: output {out} (config.json there has every setting)")
print(f"{len(es.pairs)} pairs, {len(es.keys)} images from {cfg.manifest} "
      f"({es.report.get('format')}); classes: {es.classes or 'none (no labels)'}"
      + (f"; {es.report['images_left_out']} images without one of these labels left out"
         if es.report.get("images_left_out") else ""))
if not labelled:
    print("no labels in the manifest: computing alignment and retrieval only; skipping zero-shot, "
          "linear probe, few-shot probe and end-to-end few-shot")

# ----------------------------------------------------------------------------- models
try:
    # no model flag: the published weights of --arch (tiny has none: it is for tests, random)
    weights = cfg.weights or ([] if cfg.checkpoint else [cfg.arch])
    if weights == [cfg.arch] and not cfg.weights and cfg.arch not in available_models():
        raise ValueError(f"--arch {cfg.arch} has no published weights: add --weights none for "
                         f"random weights, or --weights NAME|FILE (names: {available_models()})")
    if len(cfg.name) > len(cfg.checkpoint) + len(weights):  # before any model loads
        raise ValueError(f"--name: {len(cfg.name)} names for {len(cfg.checkpoint) + len(weights)} models")
    names = list(cfg.name)
    models = [evalmodels.from_checkpoint(p, device, names.pop(0) if names else "", precision)
              for p in cfg.checkpoint]
    models += [evalmodels.from_weights(w, cfg.arch, cfg.image_size, device, names.pop(0) if names else "",
                                       cfg.clip_norm, precision) for w in weights]
    if len({m.name for m in models}) < len(models):
        raise ValueError(f"--name: give each model its own name (rows: {[m.name for m in models]})")
    ckpt_split = next((m.split_path for m in models if m.split_path), None)
    split, how, new_split = evaldata.choose_split(es, cfg.seed, cfg.split_file, out / "split.json",
                                                  ckpt_split)
    overlap = evaldata.check_overlap(split["test"], models, cfg.allow_overlap)
    for name in (n for n, c in overlap.items() if c is None):
        print(f"warning: {name}: no split.json beside its checkpoint (or 1-2 folders up), so "
              f"whether it trained on these test images cannot be checked")
except (ValueError, OSError, KeyError, RuntimeError) as e:  # bad files, weights missing offline
    fail(e)
print(f"split: {how}: {len(split['train'])} train / {len(split['val'])} val / "
      f"{len(split['test'])} test images")
need = [s for s in ("train", "val", "test") if labelled or s == "test"]
if any(len(split[s]) < (2 if s == "test" else 1) for s in need):  # alignment's cross score: 2 pairs
    fail(f"a split part is (nearly) empty ({ {s: len(split[s]) for s in need} }); the protocol needs "
         f"train and val images and at least 2 test images: use a larger manifest")
# written only now that the data, models and split passed their checks: a refused run leaves
# no folder (or an existing one as it was)
write_json(out / "config.json", dataclasses.asdict(cfg))
if new_split:
    write_json(out / "split.json", new_split, indent=1)
    print(f"split saved to {out / 'split.json'}")


def unused_flags(weights) -> dict:
    """{flag: why} for flags given that nothing in this run uses (said, not silently ignored)."""
    defaults, why = Config(), "applies to --weights models only; checkpoints use their own"
    out = {f"--{k.replace('_', '-')}": why for k in ("image_size", "clip_norm", "arch")
           if not weights and getattr(cfg, k) != getattr(defaults, k)}
    if cfg.organ and all(p.organ for p in es.pairs):
        out["--organ"] = "fills rows without an organ value, and every row of the manifest has one"
    return out


for flag, why in unused_flags(weights).items():
    print(f"warning: {flag} is not used: it {why}")


def slug(name: str) -> str:
    """A model's folder name: its row name in lower case, runs of other characters as '-'."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "model"


def metric(value) -> dict:
    """A single-run metric in the project's {mean, std, per_seed} form."""
    return protocol.summary([value])


# ----------------------------------------------------------------------------- the protocol, per model
prompts = {o: [ECHOCARE_TEMPLATE.format(organ=o, label=c) for c in es.classes] for o in organs}
test_keys = set(split["test"])
test_pairs = [p for p in es.pairs if p.key in test_keys]  # one per caption of a test image
test_organ = np.array([es.organ[k] for k in split["test"]])
pair_organ = np.array([es.organ[p.key] for p in test_pairs])
# organ -> its rows of the test pairs / test images, for the per-organ results (an unknown organ
# has none; alignment's cross score needs two pairs)
pair_groups = {o: np.flatnonzero(pair_organ == o) for o in organs if o and (pair_organ == o).sum() >= 2}
test_groups = {o: np.flatnonzero(test_organ == o) for o in organs if o and (test_organ == o).any()}


def scoring_steps() -> int:
    """Steps of a model's scoring bar: bootstrapped metrics (3 per group) and probe fits."""
    boot = 3 if cfg.bootstrap else 0
    steps = boot * (1 + len(pair_groups))
    return steps + (len(protocol.PROBE_CS) + 2 * boot * (1 + len(test_groups)) if labelled else 0)


def alignment(heads, img_f, txt_f, bar) -> tuple[dict, dict, dict]:
    """(metrics, ci, per_organ) for alignment and retrieval on the test pairs."""
    with torch.no_grad():
        img = heads.embed_image(torch.stack([img_f[p.key] for p in test_pairs]))
        txt = heads.embed_text(torch.stack([txt_f[p.caption] for p in test_pairs]))
    captions = [p.caption for p in test_pairs]
    found = {k: metric(v) for k, v in protocol.alignment_and_retrieval(img, txt, captions).items()}
    ci = protocol.bootstrap_alignment(img, txt, cfg.bootstrap, cfg.seed, bar) if cfg.bootstrap else {}
    per_organ = {}
    for o, sel in pair_groups.items():
        block = protocol.alignment_and_retrieval(img[sel], txt[sel], [captions[i] for i in sel])
        per_organ[o] = {"metrics": {k: metric(v) for k, v in block.items()}, "n_pairs": len(sel),
                        "ci": protocol.bootstrap_alignment(img[sel], txt[sel], cfg.bootstrap, cfg.seed, bar)
                        if cfg.bootstrap else {}}
    return found, ci, per_organ


def arrays(img_f, part):
    """(features [N, F], labels [N], organ index [N]) of one split part."""
    ks = split[part]
    return (torch.stack([img_f[k] for k in ks]), torch.tensor([es.label[k] for k in ks]),
            torch.tensor([organs.index(es.organ[k]) for k in ks]))


def scored(prefix, probs, y, found, ci, per_organ, bar):
    """Add acc / weighted F1 / AUROC of `probs`, overall and per organ, with bootstrap CIs."""
    found.update({f"{prefix}_{k}": metric(v) for k, v in protocol.classification_report(probs, y).items()})
    if cfg.bootstrap:
        boot = protocol.bootstrap_cls(probs, y, cfg.bootstrap, cfg.seed, bar)
        ci.update({f"{prefix}_{k}": v for k, v in boot.items()})
    for o, sel in test_groups.items():
        block = per_organ.setdefault(o, {"metrics": {}, "ci": {}})
        block["n_test"] = len(sel)
        block["metrics"].update({f"{prefix}_{k}": metric(v)
                                 for k, v in protocol.classification_report(probs[sel], y[sel]).items()})
        if cfg.bootstrap:
            boot = protocol.bootstrap_cls(probs[sel], y[sel], cfg.bootstrap, cfg.seed, bar)
            block["ci"].update({f"{prefix}_{k}": v for k, v in boot.items()})


def zero_shot_and_probe(heads, parts, prompt_f, emb, found, ci, per_organ, bar) -> dict:
    """Zero-shot and the linear probe (C by validation weighted F1), scored into found/ci/
    per_organ; returns the probe's {C, val_f1}."""
    y_te = parts["test"][1].numpy()
    zs = protocol.zeroshot_probs(heads, parts["test"][0], prompt_f, parts["test"][2])
    scored("zs", zs, y_te, found, ci, per_organ, bar)
    probs, probe_info = protocol.linear_probe(emb["train"], parts["train"][1].numpy(), emb["val"],
                                              parts["val"][1].numpy(), emb["test"], len(es.classes), bar=bar)
    scored("probe", probs, y_te, found, ci, per_organ, bar)
    return probe_info


def fewshot_probe(model, parts, emb) -> dict:
    """{fraction: [report per seed]} of the few-shot linear probe."""
    y = {s: parts[s][1].numpy() for s in parts}
    with protocol.progress(len(cfg.probe_fractions) * len(cfg.probe_seeds),
                           f"few-shot probe ({model.name})") as bar:
        return protocol.fewshot_probe(emb["train"], y["train"], emb["val"], y["val"], emb["test"], y["test"],
                                      cfg.probe_fractions, cfg.probe_seeds, len(es.classes),
                                      groups=test_groups, bar=bar)


def fewshot_e2e(model, heads, parts, prompt_f, lr) -> dict:
    """{fraction: [report per seed]} of the end-to-end few-shot (heads and temperature train)."""
    total = len(cfg.e2e_fractions) * len(cfg.e2e_seeds) * cfg.e2e_epochs
    with protocol.progress(total, f"end-to-end few-shot ({model.name})") as bar:
        return protocol.e2e_fewshot(heads, parts["train"], parts["val"], parts["test"], prompt_f,
                                    cfg.e2e_fractions, cfg.e2e_seeds, lr, cfg.e2e_epochs,
                                    cfg.e2e_batch_size, groups=test_groups, bar=bar)


def fewshot_blocks(probe_runs, e2e_runs, per_organ) -> dict:
    """results["fewshot"] (overall), and each organ's under per_organ[organ]["fewshot"]."""
    for o in test_groups:
        per_organ[o]["fewshot"] = {**protocol.fewshot_summary(probe_runs, "probe", o),
                                   **protocol.fewshot_summary(e2e_runs, "e2e", o)}
    return {**protocol.fewshot_summary(probe_runs, "probe"), **protocol.fewshot_summary(e2e_runs, "e2e")}


def classification(model, heads, img_f, txt_f, found, ci, per_organ, bar) -> tuple[dict, dict]:
    """Zero-shot, linear probe, few-shot probe and end-to-end few-shot; returns (fewshot, details)."""
    parts = {s: arrays(img_f, s) for s in ("train", "val", "test")}
    prompt_f = torch.stack([torch.stack([txt_f[t] for t in prompts[o]]) for o in organs])  # [O, C, F']
    with torch.no_grad():
        emb = {s: heads.embed_image(parts[s][0]).double().numpy() for s in parts}
    probe_info = zero_shot_and_probe(heads, parts, prompt_f, emb, found, ci, per_organ, bar)
    bar.close()  # the few-shot stages have their own bars
    probe_runs = fewshot_probe(model, parts, emb)
    lr = cfg.e2e_lr or (5e-6 if model.vanilla else 1e-5)
    e2e_runs = fewshot_e2e(model, heads, parts, prompt_f, lr)
    fewshot = fewshot_blocks(probe_runs, e2e_runs, per_organ)
    e2e = {"lr": lr, "best_epoch": {f"{f:g}": [r["best_epoch"] for r in v] for f, v in e2e_runs.items()},
           "heads_trainable": model.source.get("heads_trainable", True)}
    return fewshot, {"probe": probe_info, "e2e": e2e}


all_results = []
for model in models:
    mdir = out / slug(model.name)
    keys = [k for s in need for k in split[s]]
    texts = [p.caption for p in test_pairs] + ([t for o in organs for t in prompts[o]] if labelled else [])
    where = {p.key: str(p.image) for p in es.pairs}
    img_f, txt_f = evalmodels.cached_features(model, mdir / "features.pt", keys, [where[k] for k in keys],
                                              texts, cfg.batch_size, cfg.workers)
    heads = model.heads.eval()
    fewshot, details, skipped = {}, {}, []
    with protocol.single_thread(), protocol.progress(scoring_steps(), f"scoring ({model.name})") as bar:
        found, ci, per_organ = alignment(heads, img_f, txt_f, bar)
        if labelled:
            try:
                fewshot, details = classification(model, heads, img_f, txt_f, found, ci, per_organ, bar)
            except ValueError as e:  # e.g. a class missing from the training split of a tiny set
                fail(f"{model.name}: {e}")
    if not labelled:
        skipped = ["zero-shot", "linear probe", "few-shot probe", "end-to-end few-shot"]

    results = {
        "script": "evaluate.py", "task": "align", "dataset": Path(cfg.manifest).stem, "row": model.name,
        "backbone": model.kind, "adapter": model.source.get("adapter"), "init": model.source.get("checkpoint"),
        "seeds": list(cfg.probe_seeds), "classes": es.classes, "organs": organs,
        "metrics": found, "ci": ci, "per_organ": per_organ, "fewshot": fewshot, "skipped": skipped,
        "details": details, "split": {"how": how, **{s: len(split[s]) for s in ("train", "val", "test")}},
        "overlap": overlap[model.name], "prompt": ECHOCARE_TEMPLATE, "units": {"mean_rank": "rank (1-based)"},
        "n_test": len(split["test"]), "n_pairs": len(test_pairs), "n_dropped": 0, "source": model.source,
        "data": {**{k: v for k, v in es.report.items() if k != "bad_rows"},
                 "bad_rows": len(es.report.get("bad_rows", []))},  # what the manifest reading left out
        "machine": f"{device.type}, CPU capability {torch.backends.cpu.get_cpu_capability()}",
        "precision": precision, "config": dataclasses.asdict(cfg), "version": clip_us.__version__,
    }
    if model.source.get("weights") == "none":
        results["warning"] = "random weights: these numbers say nothing about CLIP"
    mdir.mkdir(parents=True, exist_ok=True)
    tables.write_results(mdir, results)
    all_results.append(results)
    m = found
    line = (f"{model.name}: paired {m['paired']['mean']:.3f} cross {m['cross']['mean']:.3f} "
            f"gap {m['gap']['mean']:.3f}")
    if labelled:
        line += f"  zero-shot acc {m['zs_acc']['mean']:.3f}  probe acc {m['probe_acc']['mean']:.3f}"
    print(line + f"  -> {mdir / 'results.json'}")

# ----------------------------------------------------------------------------- table and figures
buf = io.StringIO()
rows = [list(csv.reader(io.StringIO(tables.row_csv(r)))) for r in all_results]
csv.writer(buf, lineterminator="\n").writerows([rows[0][0]] + [r[1] for r in rows])
write_text(out / "table.csv", buf.getvalue())
note = f"{device.type}, CPU capability {torch.backends.cpu.get_cpu_capability()}" + \
    ("; whiskers: 95% bootstrap CI" if cfg.bootstrap else "; no CIs (--bootstrap 0)")


def bars(keys):
    """{model: [(mean, CI low, CI high) or None per metric]} for a bar chart."""
    def bar(r, k):
        ci = r["ci"].get(k, {})
        return (r["metrics"][k]["mean"], ci.get("low"), ci.get("high")) if k in r["metrics"] else None
    return {r["row"]: [bar(r, k) for k in keys] for r in all_results}


evalplots.save_bars_svg(out / "alignment.svg", "alignment (test pairs)", ["paired", "cross", "gap"],
                        bars(["paired", "cross", "gap"]), "cosine", note)
if labelled:
    for prefix, title in (("zs", "zero-shot"), ("probe", "linear probe")):
        evalplots.save_bars_svg(out / f"{prefix}.svg", f"{title} (test images)",
                                ["acc", "weighted F1", "AUROC"],
                                bars([f"{prefix}_{k}" for k in protocol.CLS_METRICS]), "score", note)
    for prefix, title in (("probe", "few-shot linear probe"), ("e2e", "end-to-end few-shot")):
        series = {r["row"]: [(float(f), v["mean"], v["std"])
                             for f, v in r["fewshot"][f"{prefix}_acc"].items()] for r in all_results}
        evalplots.save_fewshot_svg(out / f"fewshot_{prefix}.svg",
                                   f"{title}: accuracy (mean ± std over seeds)", series, "accuracy",
                                   note.split(";")[0])
print(f"table: {out / 'table.csv'}; figures in {out}")
