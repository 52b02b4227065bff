"""train_contrastive.py: contrastive fine-tuning of CLIP on image-caption pairs.

`--train adapter` (the default) is the first stage (§3.1, Fig. 1a) of the ultrasound-CLIP paper
(Qu et al., "Adapting Vision-Language Foundation Model for Next Generation Medical Ultrasound
Image Analysis"), the "ft." of its Tables 2 and 3: CLIP ViT-B/16 frozen, Mona or LoRA in the
vision tower trains, symmetric InfoNCE with the temperature fixed at 0.07, AdamW (1e-4, betas
(0.9, 0.95), weight decay 0.01), cosine schedule per iteration to 1e-8 over all --epochs,
gradient clipping 1.0, batch 32 per process (the paper's; its official code used 64), the lowest
validation loss picks the checkpoint, early stopping after 10 epochs without improvement.
`--train heads|image|text|full` is the partial fine-tuning of EchoCare-CLIP ("Ultrasound
Vision-Language Alignment via Contrastive Learning") in CLIP's own space, with a learnable
temperature; `--model echocare` is its dual encoder. The checkpoint is what `--init` of
train_seg.py, train_cls.py and zeroshot.py reads. The options are clip_us.config.ContrastiveConfig.

    python train_contrastive.py                                   # the phantom's captions
    python train_contrastive.py --manifest data/pmc_curd/pmc_curd_dataset.csv --adapter lora
    python train_contrastive.py --manifest data/medpix/medpix_dataset.csv \\
        --manifest data/pmc_curd/pmc_curd_dataset.csv      # both, as the official code
    python train_contrastive.py --manifest captions.csv --train heads --split 70,15,15 \\
        --hold-out Dataset_BUSI_with_GT,Liver_ultrasound
    torchrun --nproc_per_node 2 train_contrastive.py ...           # DDP (gloo on CPU, nccl on CUDA)
"""
from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

import clip_us
from clip_us import echocare, loop, phantom, tables
from clip_us.adapters import AdapterConfig, apply_adapter, count_parameters, identity
from clip_us.captions import manifest, phantom_manifest
from clip_us.config import (
    ContrastiveConfig,
    EchoCareOptions,
    fail,
    given_fields,
    parse_config,
    report_errors,
)
from clip_us.contrastive import ContrastiveCLIP, caption_dataset, set_trainable, validate
from clip_us.loop import barrier, gather_list, setup_distributed, shard
from clip_us.losses import clip_loss
from clip_us.precision import resolve_precision
from clip_us.runs import (
    JsonlLogger,
    RunFolder,
    default_out_dir,
    fmt,
    make_results,
    read_jsonl,
    row_name,
    summarize_seeds,
)
from clip_us.transform import mean_std
from clip_us.viz import save_curves_svg, save_training_curves
from clip_us.weights import build_clip

# retrieval as evaluate.py reports it (metrics.strict_retrieval, metrics.dup_retrieval)
METRICS = ("loss", *(f"{rule}_{way}_{m}" for rule in ("strict", "dup") for way in ("i2t", "t2i")
                     for m in ("R@1", "R@5", "R@10", "mean_rank")), "paired", "cross", "gap")


# ----------------------------------------------------------------------------- setup
ECHOCARE_ONLY = [f.name for f in dataclasses.fields(EchoCareOptions)]


def resolve_clip(cfg: ContrastiveConfig) -> ContrastiveConfig:
    """--model clip: no EchoCare-CLIP flag, an adapter only with --train adapter (its default,
    Mona, then); refusals say what to type instead."""
    defaults = ContrastiveConfig()
    stray = [f"--{k.replace('_', '-')}" for k in ECHOCARE_ONLY
             if getattr(cfg, k) != getattr(defaults, k)]
    if stray:
        fail(f"{', '.join(stray)} only apply to --model echocare")
    if cfg.train != "adapter" and cfg.adapter not in ("", "none"):
        fail(f"--adapter {cfg.adapter} with --train {cfg.train}: the partial fine-tuning "
             f"modes train CLIP's own weights; drop --adapter (or use --train adapter)")
    if cfg.train == "adapter" and cfg.adapter == "none":
        fail("--train adapter with --adapter none trains nothing; choose --adapter mona|lora "
             "or --train heads|image|text|full")
    cfg.adapter = cfg.adapter or ("mona" if cfg.train == "adapter" else "none")
    return cfg


def resolve(cfg: ContrastiveConfig, given: set) -> ContrastiveConfig:
    """Check the flag combinations and fill the defaults that depend on --model and --train:
    for --model echocare, the authors' recipe (echocare.RECIPE) where a flag was not given."""
    if cfg.model == "clip":
        return resolve_clip(cfg)
    if cfg.adapter not in ("", "none") or ("train" in given and cfg.train == "adapter"):
        fail("--model echocare has no adapters: use --train heads|image|text|full")
    recipe = {**echocare.RECIPE, "train": "heads", "adapter": "none"}
    for key, value in recipe.items():
        if key not in given and hasattr(cfg, key):
            setattr(cfg, key, value)
    return cfg


cfg = parse_config(ContrastiveConfig, description=__doc__.split("\n\n")[0],
                   epilog="\n\n".join(__doc__.split("\n\n")[1:]))
report_errors(cfg.debug)  # an uncaught user error: one line, exit status 2
given = given_fields(ContrastiveConfig)
cfg = resolve(cfg, given)
temperature = cfg.temperature or (0.07 if cfg.train == "adapter" else 0.0)  # 0.0 = learnable
rank, world, device = setup_distributed(cfg.device)
is_main = rank == 0
precision = resolve_precision(cfg.precision, device, verbose=is_main)  # what validation runs in
row = "EchoCare-CLIP" if cfg.model == "echocare" else row_name("clip", cfg.adapter, True,
                                                                train=cfg.train)
dataset_name = "+".join(Path(m).stem for m in cfg.manifest) or "phantom"
out = Path(cfg.out_dir or default_out_dir("train_contrastive", dataset_name, cfg.train,
                                          cfg.adapter))
what = identity("train_contrastive", "contrastive", cfg.model, cfg.adapter, cfg.train)  # its record
folder = RunFolder(out, cfg.resume, given=bool(cfg.out_dir), main=is_main, expect=what)
folder.check()  # the folder is made at the first batch
if is_main:
    print(json.dumps(dataclasses.asdict(cfg), indent=2))
log = JsonlLogger(out / "log.jsonl", enabled=is_main).log
torch.manual_seed(cfg.seed)


# ----------------------------------------------------------------------------- data
def manifest_paths() -> list[Path]:
    """--manifest (each, in the order given), or the phantom's caption manifest (written once
    into the cache, offline)."""
    if cfg.manifest:
        return [Path(m) for m in cfg.manifest]
    pcfg = phantom.PhantomConfig(n=cfg.phantom_n, size=cfg.phantom_size, organs=phantom.ORGANS,
                                 p_normal=0.17)
    return [phantom_manifest(cfg=pcfg)]


def read_split(pairs: list, report: dict) -> dict:
    """--split-file, else the run's own split.json (a resumed run), else a new one over all the
    manifests' pairs together (as the official code splits MedPix + PMC-CURD), which the run
    folder saves when the run begins (its record names each manifest, with its counts)."""
    saved = Path(cfg.split_file) if cfg.split_file else out / "split.json"
    if saved.is_file():
        return manifest.load_split(saved, pairs)
    seed = cfg.seed if cfg.split_seed < 0 else cfg.split_seed
    hold = [h.strip() for h in cfg.hold_out.split(",") if h.strip()]
    if "hold_out" not in given and hold:  # the recipe's: those the manifest has, said either way
        hold, said = echocare.recipe_hold_out(cfg.hold_out, {p.dataset for p in pairs})
        if is_main:
            print(said)
    split = manifest.make_split(pairs, cfg.split, seed, hold)
    folder.split = {"manifests": report["manifests"], "seed": seed, "spec": cfg.split,
                    "hold_out": cfg.hold_out, **split}
    return split


if not is_main:  # rank 0 writes the phantom first; the other ranks then read it (same split)
    barrier()
paths = manifest_paths()
pairs, report = manifest.merge_manifests(paths, cfg.image_col or None, cfg.caption_col or None,
                                         cfg.ascii_only, cfg.skip_bad)
split = read_split(pairs, report)
if is_main:
    barrier()
    print(manifest.describe(report))
parts = manifest.split_pairs(pairs, split)
if not parts["train"] or len(parts["val"]) < 2:
    fail(f"{', '.join(map(str, paths))}: {len(parts['train'])} training and {len(parts['val'])} validation pairs after "
         f"the split ({split['how']}); contrastive training needs both (>= 2 for validation)")
train_set = caption_dataset(parts["train"], cfg.image_size, cfg.clip_norm)
val_set = caption_dataset(parts["val"], cfg.image_size, cfg.clip_norm)
if is_main:
    print(f"data: {len(train_set)} train / {len(val_set)} val / {len(parts['test'])} test / "
          f"{len(parts['held_out'])} held out pairs ({split['how']})")


# ----------------------------------------------------------------------------- model
def clip_model() -> ContrastiveCLIP:
    """CLIP (weights or random tiny), the adapter, and requires_grad as --train names it."""
    clip = build_clip(cfg.weights, cfg.arch)
    apply_adapter(clip, AdapterConfig(kind=cfg.adapter, mona_variant=cfg.mona_variant), freeze=False)
    model = ContrastiveCLIP(clip, temperature)
    set_trainable(model, cfg.train, learn_temperature=temperature == 0.0)
    return model


def echocare_model():
    """EchoCare-CLIP's dual encoder (Swin + CLIP/BERT text, MLP heads), with the same forward, and
    data sets of its own (its transform and statistics): docs/contrastive.md."""
    return echocare.for_contrastive(
        parts, device, cfg.train, text_encoder=cfg.text_encoder,
        arch="tiny" if cfg.arch == "tiny" else "echocare",
        random_weights=cfg.weights.lower() == "none",
        image_weights=cfg.image_weights or None, text_weights=cfg.text_weights or None,
        norm=cfg.norm_stats, image_size=cfg.image_size, grad_checkpointing=cfg.grad_checkpointing,
        augment=cfg.augment)


if cfg.model == "echocare":
    model, train_set, val_set = echocare_model()
else:
    model = clip_model().to(device)
adapter_cfg = AdapterConfig(kind=cfg.adapter, mona_variant=cfg.mona_variant)
trainable, total = count_parameters(model)
captions = [p.caption for p in val_set.pairs]
mean, std = mean_std(cfg.clip_norm)
norm = {"clip_norm": cfg.clip_norm, "mean": list(mean), "std": list(std)}
if cfg.model == "echocare":  # its own statistics (the authors' or this run's training split)
    norm = {"clip_norm": False, "mean": list(model.mean), "std": list(model.std)}
if is_main:
    print(f"{row}: trainable {trainable:,} / {total:,} parameters, temperature "
          f"{'learnable' if temperature == 0 else temperature}")


# ----------------------------------------------------------------------------- training
def loss_step(batch, net):
    """Symmetric InfoNCE over the global batch (features gathered from every rank)."""
    img, txt, scale = net(batch["image"].to(device), batch["text"].to(device))
    return clip_loss(img.float(), txt.float(), scale)


val_loader = DataLoader(shard(val_set, rank, world), batch_size=cfg.batch_size,
                        num_workers=cfg.workers)


def evaluate(model) -> tuple[float, dict]:
    """Validation loss (the score: lower wins), retrieval and alignment on all ranks' pairs."""
    # The validation loss over batches of the global training batch, so 2 ranks x B equal 1 x 2B.
    metrics = validate(model, val_loader, captions, cfg.batch_size * world, device,
                       gather=gather_list if world > 1 else None,
                       precision=precision, stable_ties=cfg.stable_ties)
    return metrics["loss"], metrics


def untrained_metrics() -> dict:
    """The validation before training, logged once: a resumed run reads it from its log.jsonl
    (every rank alike), so the log never holds it twice."""
    logged = [r["untrained"] for r in read_jsonl(out / "log.jsonl") if "untrained" in r]
    if cfg.resume and logged:
        return logged[0]
    metrics = evaluate(model)[1]
    log(untrained=metrics)
    return metrics


settings = loop.Settings.of(cfg, eval_every=1, best="min", nonfinite="skip", metric="loss",
                            unit="pairs")
loader = loop.train_loader(train_set, cfg.batch_size, cfg.workers, cfg.seed, rank, world)
folder.begin(cfg)  # all of the above was validation: the run folder is made at the first batch
untrained = untrained_metrics()
if is_main:
    print("untrained: " + ", ".join(f"{k} {fmt(untrained.get(k))}" for k in METRICS))
start = time.time()
# too many non-finite batches in a row raise FloatingPointError (a user error); best.pt is kept
state = loop.train(model, loader, loss_step, evaluate, seed=cfg.seed, out_dir=out,
                   settings=settings, log=log, is_main=is_main, resume=cfg.resume,
                   extra={"config": dataclasses.asdict(cfg), "script": "train_contrastive",
                          "what": what,
                          "seed": cfg.seed, "adapter_config": dataclasses.asdict(adapter_cfg),
                          "train_mode": cfg.train, "temperature": temperature or None,
                          "normalisation": norm, "version": clip_us.__version__})
seconds = time.time() - start
final = evaluate(model)[1]


# ----------------------------------------------------------------------------- results
if is_main:
    results = make_results(
        script="train_contrastive.py", task="contrastive", dataset=dataset_name, row=row,
        backbone=cfg.model, adapter=cfg.adapter, seeds=[cfg.seed],
        metrics=summarize_seeds([{k: final.get(k) for k in METRICS}], METRICS),
        precision=precision, config=cfg,
        data={k: report[k] for k in ("format", "rows", "kept", "dropped", "mostly_non_ascii",
                                     "manifests")},
        train=cfg.train, manifest=str(paths[0]) if len(paths) == 1 else list(map(str, paths)), untrained={k: untrained.get(k) for k in METRICS},
        temperature=final["temperature"], best_epoch=state["best_epoch"],
        epochs_run=state["epoch"], skipped_batches=state["skipped"], n_train=len(train_set),
        n_val=len(val_set), split=split["how"],
        parameters={"trainable": trainable, "total": total}, seconds=round(seconds, 1),
        normalisation=norm, checkpoint=str(out / "best.pt"))
    tables.write_results(out, results)
    records = read_jsonl(out / "log.jsonl")
    save_training_curves(records, out / "loss.svg", "loss", loss_name="InfoNCE",
                         metric_name="InfoNCE", title=row)
    val_records = [r for r in records if "val" in r and "epoch" in r]
    save_curves_svg({k: [(r["epoch"], r["val"].get(k, float("nan"))) for r in val_records]
                     for k in ("dup_i2t_R@1", "dup_t2i_R@1", "gap")},
                    out / "retrieval.svg", f"{row}: validation", "epoch", "R@1 / alignment gap")
    print(f"\n{row}: trainable {trainable:,} / {total:,} parameters "
          f"({100 * trainable / max(total, 1):.2f}%), {seconds / 60:.1f} min, best epoch "
          f"{state['best_epoch']} of {state['epoch']}, {state['skipped']} non-finite batches "
          f"skipped")
    print("best: " + ", ".join(f"{k} {fmt(final.get(k))}" for k in METRICS))
    # where the checkpoint can be used: --init takes a CLIP; EchoCare-CLIP has no CLIP adapter
    use = "for --init, or evaluate.py --checkpoint" if cfg.model == "clip" else \
        "for evaluate.py --checkpoint; it has no CLIP adapter for --init"
    print(f"checkpoint ({use}): {out / 'best.pt'}\nresults: {out / 'results.json'}")
