"""train_contrastive.py: contrastive fine-tuning of CLIP on image-caption pairs.

`--train adapter` (the default) is seed 003's first stage (§3.1, Fig. 1a), the "ft." of Tables 2
and 3: CLIP ViT-B/16 frozen, Mona or LoRA in the vision tower trains, symmetric InfoNCE with the
temperature fixed at 0.07, AdamW (1e-4, betas (0.9, 0.95), weight decay 0.01), cosine schedule
per iteration to 1e-8 over all --epochs, gradient clipping 1.0, batch 32, the lowest validation
loss picks the checkpoint, early stopping after 10 epochs without improvement. `--train heads|
image|text|full` is EchoCare-CLIP's partial fine-tuning in CLIP's own space, with a learnable
temperature. The checkpoint is what `--init` of train_seg.py, train_cls.py and zeroshot.py reads.

    python train_contrastive.py                                   # the phantom's captions
    python train_contrastive.py --manifest data/pmc_curd/pmc_curd_dataset.csv --adapter lora
    python train_contrastive.py --manifest captions.csv --train heads --split 70,15,15 \
        --hold-out busi,liver
    torchrun --nproc_per_node 2 train_contrastive.py ...           # DDP (gloo on CPU, nccl on CUDA)
"""
from __future__ import annotations

import dataclasses
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils.data import DataLoader

import clip_us
from clip_us import loop, phantom, tables
from clip_us.adapters import AdapterConfig, apply_adapter, count_parameters
from clip_us.captions import manifest
from clip_us.config import parse_config
from clip_us.contrastive import TRAIN_MODES, CaptionDataset, ContrastiveCLIP, set_trainable, validate
from clip_us.fileio import write_json
from clip_us.loop import barrier, gather_list, setup_distributed, shard
from clip_us.losses import clip_loss
from clip_us.precision import resolve_precision
from clip_us.runs import JsonlLogger, fmt, read_jsonl, summarize_seeds
from clip_us.taskmodel import build_clip
from clip_us.transform import CLIP_MEAN, CLIP_STD
from clip_us.viz import save_curves_svg, save_training_curves

MODELS = ("clip", "echocare")
METRICS = ("loss", "i2t_R@1", "i2t_R@5", "i2t_R@10", "t2i_R@1", "t2i_R@5", "t2i_R@10",
           "paired", "cross", "gap")


@dataclass
class Config:
    """Seed 003's contrastive stage as its official code runs it, plus EchoCare-CLIP's modes."""
    manifest: str = field(default="", metadata={"help": "image-caption CSV or JSONL ('' = the "
                                                "phantom's caption manifest, written offline)"})
    image_col: str = field(default="", metadata={"help": "image column ('' = detect)"})
    caption_col: str = field(default="", metadata={"help": "caption column ('' = detect)"})
    ascii_only: bool = field(default=False, metadata={
        "help": "delete characters outside the official code's ASCII whitelist before the "
                "20-character rule"})
    skip_bad: bool = field(default=False, metadata={"help": "skip and count rows whose image "
                                                    "is missing or unreadable"})
    split: str = field(default="90,10", metadata={
        "help": "without a split column: train,val (seeded shuffle, the official code) or "
                "train,val,test (stratified by dataset, EchoCare-CLIP)"})
    split_file: str = field(default="", metadata={"help": "reuse a saved split.json"})
    split_seed: int = field(default=-1, metadata={"help": "seed of the split (-1 = --seed)"})
    hold_out: str = field(default="", metadata={"help": "data sets kept out of training, "
                                                "comma-separated (EchoCare-CLIP: busi,liver)"})
    phantom_n: int = field(default=400, metadata={"help": "phantom: number of images"})
    phantom_size: int = field(default=256, metadata={"help": "phantom: image side in pixels"})
    model: str = field(default="clip", metadata={"choices": list(MODELS), "help":
                       "clip (seed 003) or echocare (EchoCare-CLIP's dual encoder; its authors' "
                       "recipe becomes the default of every flag not given)"})
    text_encoder: str = field(default="clip", metadata={"choices": ["clip", "bert"], "help":
                              "--model echocare: CLIP ViT-B/32's text tower or BioClinicalBERT"})
    image_weights: str = field(default="", metadata={"help": "--model echocare: the EchoCare "
                               "Swin checkpoint ('' = the cache)"})
    text_weights: str = field(default="", metadata={"help": "--model echocare: text weights "
                              "('' = ViT-B/32 or the cached Bio_ClinicalBERT folder)"})
    norm_stats: str = field(default="authors", metadata={"choices": ["authors", "train"], "help":
                            "--model echocare: the authors' mean/std, or this run's "
                                    "training split's"})
    grad_checkpointing: bool = field(default=False, metadata={"help": "--model echocare: "
                                     "recompute activations in backward (less memory)"})
    augment: bool = field(default=True, metadata={"help": "--model echocare: the authors' random "
                          "crop and flip in training; --no-augment trains on the evaluation "
                          "transform"})
    train: str = field(default="adapter", metadata={"choices": list(TRAIN_MODES), "help":
                       "adapter: only the adapter; heads: visual.proj, text_projection, "
                       "logit_scale; image / text: + that tower; full: everything"})
    adapter: str = field(default="", metadata={"choices": ["", "none", "lora", "mona"], "help":
                         "'' = mona with --train adapter, none otherwise"})
    temperature: float = field(default=0.0, metadata={
        "help": "0 = fixed 0.07 with --train adapter, learnable (from CLIP's logit_scale) "
                "otherwise; T > 0 fixes it at T"})
    arch: str = field(default="ViT-B/16", metadata={"help": "ViT-B/16, tiny, ..."})
    weights: str = field(default="ViT-B/16", metadata={"help": "name, path, or none"})
    image_size: int = 224
    clip_norm: bool = field(default=True, metadata={"help": "CLIP mean/std; --no-clip-norm "
                                                    "feeds [0,1] pixels as the official code"})
    seed: int = 1
    epochs: int = field(default=1000, metadata={"help": "the cosine horizon; early stopping "
                                                "usually ends the run first (official: 1000)"})
    batch_size: int = field(default=32, metadata={"help": "per process, as in the supervised "
                                                  "scripts (the paper's 32; the official code "
                                                  "used 64)"})
    lr: float = 1e-4
    betas: list = field(default_factory=lambda: [0.9, 0.95])
    weight_decay: float = 0.01
    decay: str = field(default="all", metadata={"choices": ["all", "matrices"], "help":
                       "all: every trainable tensor decays (official code); matrices: not "
                       "norms, biases, embeddings"})
    min_lr: float = 1e-8
    schedule: str = field(default="iter", metadata={"choices": ["iter", "epoch"], "help":
                          "cosine stepped per iteration (seed 003) or per epoch (EchoCare-CLIP)"})
    grad_clip: float = 1.0
    patience: int = field(default=10, metadata={"help": "epochs without a lower val loss"})
    max_skips: int = field(default=5, metadata={"help": "non-finite batches in a row that stop "
                                                "the run (single ones are skipped, counted)"})
    amp: bool = field(default=True, metadata={"help": "training steps: bf16 autocast on CUDA "
                                              "(no-op on CPU)"})
    precision: str = field(default="fp32", metadata={
        "choices": ["fp32", "bf16"], "help": "validation passes: fp32, or bf16 (autocast on CUDA "
        "and on CPUs with native bf16; elsewhere fp32, with a message)"})
    workers: int = 2
    device: str = "auto"
    out_dir: str = ""
    resume: bool = False


def fail(message: str):
    """A usage or data error: the message, no traceback, exit status 2."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


# ----------------------------------------------------------------------------- setup
ECHOCARE_ONLY = ("text_encoder", "image_weights", "text_weights", "norm_stats",
                 "grad_checkpointing", "augment")


def given_flags(argv) -> set:
    """Config fields named on the command line (--flag or --flag=value, --no-flag)."""
    names = {a[2:].split("=")[0].replace("-", "_") for a in argv if a.startswith("--")}
    return names | {n[3:] for n in names if n.startswith("no_")}


def resolve(cfg: Config, given: set) -> Config:
    """Check the flag combinations and fill the defaults that depend on --model and --train."""
    defaults = Config()
    if cfg.model == "clip":
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
    from clip_us import echocare  # only --model echocare needs it
    if cfg.adapter not in ("", "none") or ("train" in given and cfg.train == "adapter"):
        fail("--model echocare has no adapters: use --train heads|image|text|full")
    recipe = {**echocare.RECIPE, "train": "heads", "adapter": "none"}
    for key, value in recipe.items():
        if key not in given and hasattr(cfg, key):
            setattr(cfg, key, value)
    return cfg


given = given_flags(sys.argv[1:])
cfg = resolve(parse_config(Config, description=__doc__.splitlines()[0]), given)
temperature = cfg.temperature or (0.07 if cfg.train == "adapter" else 0.0)  # 0.0 = learnable
rank, world, device = setup_distributed(cfg.device)
is_main = rank == 0
precision = resolve_precision(cfg.precision, device, verbose=is_main)  # what validation runs in
name = {"none": "", "lora": "LoRA", "mona": "Mona"}[cfg.adapter]
row = f"CLIP ({name or cfg.train}, ft.)" if cfg.model == "clip" else "EchoCare-CLIP"
dataset_name = Path(cfg.manifest).stem if cfg.manifest else "phantom"
out = Path(cfg.out_dir or Path("runs") / "train_contrastive" /
           f"{dataset_name}-{cfg.train}-{cfg.adapter}-{time.strftime('%Y%m%d-%H%M%S')}")
if is_main:
    print(json.dumps(dataclasses.asdict(cfg), indent=2))
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "config.json", dataclasses.asdict(cfg))
log = JsonlLogger(out / "log.jsonl", enabled=is_main).log
torch.manual_seed(cfg.seed)


# ----------------------------------------------------------------------------- data
def manifest_path() -> Path:
    """--manifest, or the phantom's caption manifest (written once into the cache, offline)."""
    if cfg.manifest:
        return Path(cfg.manifest)
    pcfg = phantom.PhantomConfig(n=cfg.phantom_n, size=cfg.phantom_size, organs=phantom.ORGANS,
                                 p_normal=0.17)
    return phantom.caption_manifest(cfg=pcfg)


def read_split(pairs: list) -> dict:
    """--split-file, else the run's own split.json (a resumed run), else a new one."""
    saved = Path(cfg.split_file) if cfg.split_file else out / "split.json"
    if saved.is_file():
        return manifest.load_split(saved, pairs)
    seed = cfg.seed if cfg.split_seed < 0 else cfg.split_seed
    hold = [h.strip() for h in cfg.hold_out.split(",") if h.strip()]
    if "hold_out" not in given:  # a recipe default: hold out only the data sets this manifest has
        hold = [h for h in hold if h.lower() in {p.dataset.lower() for p in pairs}]
    split = manifest.make_split(pairs, cfg.split, seed, hold)
    if is_main:
        manifest.save_split(out / "split.json", split, manifest=str(path), seed=seed,
                            spec=cfg.split, hold_out=cfg.hold_out)
    return split


try:
    if not is_main:  # rank 0 writes the phantom first; the other ranks then read it
        barrier()
    path = manifest_path()
    pairs, report = manifest.read_manifest(path, cfg.image_col or None, cfg.caption_col or None,
                                           cfg.ascii_only, cfg.skip_bad)
    split = read_split(pairs)
    if is_main:
        barrier()
        print(manifest.describe(report))
except (manifest.ManifestError, OSError) as e:
    fail(str(e))
parts = manifest.split_pairs(pairs, split)
if not parts["train"] or len(parts["val"]) < 2:
    fail(f"{path}: {len(parts['train'])} training and {len(parts['val'])} validation pairs after "
         f"the split ({split['how']}); contrastive training needs both (>= 2 for validation)")
train_set = CaptionDataset(parts["train"], cfg.image_size, cfg.clip_norm)
val_set = CaptionDataset(parts["val"], cfg.image_size, cfg.clip_norm)
if is_main:
    print(f"data: {len(train_set)} train / {len(val_set)} val / {len(parts['test'])} test / "
          f"{len(parts['held_out'])} held out pairs ({split['how']})")


# ----------------------------------------------------------------------------- model
def clip_model() -> ContrastiveCLIP:
    """CLIP (weights or random tiny), the adapter, and requires_grad as --train names it."""
    clip = build_clip(cfg.weights, cfg.arch)
    apply_adapter(clip, AdapterConfig(kind=cfg.adapter), freeze=False)
    model = ContrastiveCLIP(clip, temperature)
    set_trainable(model, cfg.train, learn_temperature=temperature == 0.0)
    return model


if cfg.model == "echocare":
    # EchoCare-CLIP's dual encoder (Swin + CLIP/BERT text, MLP heads) plugs in here: see
    # docs/contrastive.md. It provides a model with the same forward and its own data sets.
    try:
        from clip_us import echocare
    except ImportError:
        fail("--model echocare needs clip_us/echocare.py, which this checkout does not have yet")
    try:
        model, train_set, val_set = echocare.for_contrastive(cfg, parts, device)
    except (OSError, ValueError, KeyError) as e:  # encoder files missing or of the wrong family
        fail(str(e))
else:
    try:
        model = clip_model().to(device)
    except (OSError, ValueError, KeyError) as e:  # weights missing offline, unknown --arch, ...
        fail(str(e))
adapter_cfg = AdapterConfig(kind=cfg.adapter)
trainable, total = count_parameters(model)
captions = [p.caption for p in val_set.pairs]
norm = {"clip_norm": cfg.clip_norm, "mean": list(CLIP_MEAN if cfg.clip_norm else (0.0,) * 3),
        "std": list(CLIP_STD if cfg.clip_norm else (1.0,) * 3)}
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
                       precision=precision)
    return metrics["loss"], metrics


untrained = evaluate(model)[1]
log(untrained=untrained)
if is_main:
    print("untrained: " + ", ".join(f"{k} {fmt(untrained.get(k))}" for k in METRICS))
settings = loop.Settings.of(cfg, eval_every=1, best="min", nonfinite="skip", metric="loss",
                            unit="pairs")
loader = loop.train_loader(train_set, cfg.batch_size, cfg.workers, cfg.seed, rank, world)
start = time.time()
try:
    state = loop.train(model, loader, loss_step, evaluate, seed=cfg.seed, out_dir=out,
                       settings=settings, log=log, is_main=is_main, resume=cfg.resume,
                       extra={"config": dataclasses.asdict(cfg), "script": "train_contrastive",
                              "seed": cfg.seed, "adapter_config": dataclasses.asdict(adapter_cfg),
                              "train_mode": cfg.train, "temperature": temperature or None,
                              "normalisation": norm, "version": clip_us.__version__})
except FloatingPointError as e:  # too many non-finite batches in a row; best.pt is kept
    fail(str(e))
seconds = time.time() - start
final = evaluate(model)[1]


# ----------------------------------------------------------------------------- results
if is_main:
    results = {
        "script": "train_contrastive.py", "task": "contrastive", "dataset": dataset_name,
        "row": row, "backbone": cfg.model, "adapter": cfg.adapter, "train": cfg.train,
        "manifest": str(path), "seeds": [cfg.seed],
        "metrics": summarize_seeds([{k: final.get(k) for k in METRICS}], METRICS),
        "untrained": {k: untrained.get(k) for k in METRICS},
        "temperature": final["temperature"], "best_epoch": state["best_epoch"],
        "epochs_run": state["epoch"], "skipped_batches": state["skipped"],
        "n_train": len(train_set), "n_val": len(val_set), "split": split["how"],
        "data": {k: report[k] for k in ("format", "rows", "kept", "dropped", "mostly_non_ascii")},
        "parameters": {"trainable": trainable, "total": total}, "seconds": round(seconds, 1),
        "precision": precision,
        "normalisation": norm, "checkpoint": str(out / "best.pt"),
        "config": dataclasses.asdict(cfg), "version": clip_us.__version__,
    }
    tables.write_results(out, results)
    records = read_jsonl(out / "log.jsonl")
    save_training_curves(records, out / "loss.svg", "loss", loss_name="InfoNCE",
                         metric_name="InfoNCE", title=row)
    val_records = [r for r in records if "val" in r and "epoch" in r]
    save_curves_svg({k: [(r["epoch"], r["val"].get(k, float("nan"))) for r in val_records]
                     for k in ("i2t_R@1", "t2i_R@1", "gap")},
                    out / "retrieval.svg", f"{row}: validation", "epoch", "R@1 / alignment gap")
    print(f"\n{row}: trainable {trainable:,} / {total:,} parameters "
          f"({100 * trainable / max(total, 1):.2f}%), {seconds / 60:.1f} min, best epoch "
          f"{state['best_epoch']} of {state['epoch']}, {state['skipped']} non-finite batches "
          f"skipped")
    print("best: " + ", ".join(f"{k} {fmt(final.get(k))}" for k in METRICS))
    print(f"checkpoint (for --init): {out / 'best.pt'}\nresults: {out / 'results.json'}")
