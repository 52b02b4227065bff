"""evaluate.py: the evaluation protocol of "Ultrasound Vision-Language Alignment via Contrastive
Learning" (EchoCare-CLIP), one table row per model.

Alignment (paired / cross / gap), retrieval (strict and duplicate-aware R@1/5/10 both ways, mean
rank), zero-shot ("An ultrasound image of {organ} with {label} findings."), linear probe, few-shot
probe (1/5/10 %), end-to-end few-shot (the whole model; --e2e heads: heads + temperature) and
bootstrap 95 % CIs, the probes and few-shot runs fitted per organ (--fit pooled: once), for every
model given, as the EchoCare-CLIP authors run it (protocol notes in docs/evaluation.md).

Classes: every label present in the manifest is a class (BUSI with `normal` is a 3-class task, as
in the authors' held-out results); --classes restricts them. This differs from train_cls.py and
zeroshot.py, whose binary benign/malignant default follows Qu et al., "Adapting Vision-Language
Foundation Model for Next Generation Medical Ultrasound Image Analysis".

    python evaluate.py --manifest data/busi_captions.csv --organ breast --weights ViT-B/32
    python evaluate.py --manifest m.csv --checkpoint runs/train_contrastive/x/best.pt --name ft
    python evaluate.py --arch tiny --weights none --image-size 64   # phantom, random weights

The script reads top to bottom: config, data, models and split, then per model its features and
the protocol's blocks, its results.json, and last the table and figures. The steps are functions
of clip_us/evaluation/run.py, each with its inputs and outputs in its signature.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from clip_us import tables
from clip_us.captions import phantom_manifest
from clip_us.config import EvaluateConfig, parse_config, report_errors
from clip_us.evaluation import data as evaldata
from clip_us.evaluation import models as evalmodels
from clip_us.evaluation import plots as evalplots
from clip_us.evaluation import protocol
from clip_us.evaluation import run as evalrun
from clip_us.evaluation.prompts import ECHOCARE_TEMPLATE
from clip_us.fileio import write_json, write_text
from clip_us.loop import resolve_device
from clip_us.precision import resolve_precision
from clip_us.runs import default_out_dir, machine, make_results, slug
from clip_us.splits import save_split


def parse_args(argv=None) -> EvaluateConfig:
    """The command line from clip_us.config.EvaluateConfig ("repeat" fields add up, --checkpoint
    a --checkpoint b). The epilog is the class rule and the examples."""
    return parse_config(EvaluateConfig, argv, description=__doc__.split("\n\n")[0],
                        epilog="\n\n".join(__doc__.split("\n\n")[2:4]))


cfg = parse_args()
report_errors(cfg.debug)  # a user error: one line, exit status 2 (--debug: its traceback)
device = resolve_device(cfg.device)  # one process: no DDP here
precision = resolve_precision(cfg.precision, device)  # bf16 -> fp32 on CPUs without native bf16
torch.manual_seed(cfg.seed)

# ----------------------------------------------------------------------------- data
cfg.manifest = cfg.manifest or str(phantom_manifest())
es = evaldata.load_eval_set(cfg.manifest, cfg.organ, cfg.classes, image_col=cfg.image_col or None,
                            caption_col=cfg.caption_col or None, ascii_only=cfg.ascii_only,
                            skip_bad=cfg.skip_bad)
organs = evalrun.organs_of(es)  # refuses one class, or labelled images without an organ
labelled = bool(es.label)
skipped = [] if labelled else evalrun.SKIPPED_WITHOUT_LABELS
out = Path(cfg.out_dir or default_out_dir("evaluate", Path(cfg.manifest).stem))
print(f"evaluate.py: output {out} (config.json there has every setting)")
left_out = es.report.get("images_left_out")
print(f"{len(es.pairs)} pairs, {len(es.keys)} images from {cfg.manifest} "
      f"({es.report.get('format')}); classes: {es.classes or 'none (no labels)'}"
      + (f"; {left_out} images without one of these labels left out" if left_out else ""))
if skipped:
    print(f"no labels in the manifest: computing alignment and retrieval only; skipping "
          f"{', '.join(skipped[:-1])} and {skipped[-1]}")

# ----------------------------------------------------------------------------- models and split
weights = evalrun.weights_to_load(cfg.weights, cfg.checkpoint, cfg.arch)
models = evalrun.load_models(cfg.checkpoint, weights, cfg.name, cfg.arch, cfg.image_size,
                             cfg.clip_norm, device, precision)  # refuses bad files, missing weights
ckpt_split = next((m.split_path for m in models if m.split_path), None)
if cfg.split == "all":  # every image, as the authors scored their liver set (AULI)
    if cfg.split_file:
        raise ValueError("--split all scores every image: drop --split-file (or use --split test)")
    split, how, new_split = {"train": [], "val": [], "test": list(es.keys)}, "all images", None
else:
    split, how, new_split = evaldata.choose_split(es, cfg.seed, cfg.split_file,
                                                  out / "split.json", ckpt_split)
probes = labelled and cfg.split == "test"  # the probes and few-shot stages fit on train/val
if labelled and not probes:
    skipped = evalrun.SKIPPED_ON_ALL_IMAGES
    print(f"--split all: scoring alignment, retrieval and zero-shot on every image; skipping "
          f"{', '.join(skipped[:-1])} and {skipped[-1]} (they need training images)")
overlap = evaldata.check_overlap(split["test"], models, cfg.allow_overlap)
for name in (n for n, c in overlap.items() if c is None):
    print(f"warning: {name}: no split.json beside its checkpoint (or 1-2 folders up), so "
          f"whether it trained on these test images cannot be checked")
print(f"split: {how}: {len(split['train'])} train / {len(split['val'])} val / "
      f"{len(split['test'])} test images")
need = evalrun.parts_needed(split, probes)  # refuses (nearly) empty parts
# written only now that the data, models and split passed their checks: a refused run leaves
# no folder (or an existing one as it was)
write_json(out / "config.json", dataclasses.asdict(cfg))
if new_split:
    save_split(out / "split.json", new_split)
    print(f"split saved to {out / 'split.json'}")
for flag, why in evalrun.unused_flags(cfg, weights, es.pairs).items():
    print(f"warning: {flag} is not used: it {why}")

# ----------------------------------------------------------------------------- per model
test = evalrun.test_data(es, split, organs, cfg.prompt_organ)  # test pairs, prompts, organ rows
settings = evalrun.Settings.of(cfg)
steps = evalrun.scoring_steps(test, cfg.bootstrap, labelled, probes, cfg.fit)
keys = [k for s in need for k in split[s]]  # the images to embed
where = {p.key: str(p.image) for p in es.pairs}
prompts = [t for ps in test.prompts for t in ps] if labelled else []
texts = [p.caption for p in test.pairs] + prompts  # the texts to embed
data = {**{k: v for k, v in es.report.items() if k != "bad_rows"},
        "bad_rows": len(es.report.get("bad_rows", []))}  # what the manifest reading left out
all_results = []
for model in models:
    mdir = out / slug(model.name)
    img_f, txt_f = evalmodels.cached_features(model, mdir / "features.pt", keys,
                                              [where[k] for k in keys], texts, cfg.batch_size,
                                              cfg.workers)
    heads = model.heads.eval()
    with protocol.single_thread(), protocol.progress(steps, f"scoring ({model.name})") as bar:
        scores = evalrun.alignment(heads, img_f, txt_f, test, cfg.bootstrap, cfg.seed, bar,
                                   cfg.stable_ties)
        if labelled and not probes:
            scores = evalrun.merge(scores, evalrun.zero_shot(heads, img_f, txt_f, test, settings,
                                                             bar))
        elif labelled:
            try:
                scores = evalrun.merge(scores, evalrun.classification(model, heads, img_f, txt_f,
                                                                      test, settings, bar, where))
            except ValueError as e:  # e.g. a class missing from the training split of a tiny set
                raise ValueError(f"{model.name}: {e}") from e

    results = make_results(
        script="evaluate.py", task="align", dataset=Path(cfg.manifest).stem, row=model.name,
        backbone=model.kind, adapter=model.source.get("adapter"),
        init=model.source.get("checkpoint"), seeds=list(cfg.probe_seeds),
        metrics=scores["metrics"], units={"mean_rank": "rank (1-based)"},
        n_test=len(split["test"]), n_dropped=0, machine=machine(device), precision=precision,
        data=data, config=cfg, random_weights=model.source.get("weights") == "none",
        classes=es.classes, organs=organs, ci=scores["ci"], per_organ=scores["per_organ"],
        fewshot=scores.get("fewshot", {}), skipped=skipped, details=scores.get("details", {}),
        fit=cfg.fit if probes else None, across_organs=scores.get("across_organs", {}),
        split={"how": how, **{s: len(split[s]) for s in ("train", "val", "test")}},
        overlap=overlap[model.name], n_pairs=len(test.pairs),
        prompt=ECHOCARE_TEMPLATE.replace("{organ}", cfg.prompt_organ or "{organ}"),
        retrieval_ties="stable" if cfg.stable_ties else "authors (np.argsort, float32)",
        source=model.source)
    mdir.mkdir(parents=True, exist_ok=True)
    tables.write_results(mdir, results)
    all_results.append(results)
    print(evalrun.summary_line(model.name, scores["metrics"], labelled)
          + f"  -> {mdir / 'results.json'}")

# ----------------------------------------------------------------------------- table and figures
write_text(out / "table.csv", evalrun.table_csv(all_results))
evalplots.save_figures(out, all_results, labelled, machine(device), cfg.bootstrap)
print(f"table: {out / 'table.csv'}; figures in {out}")
