"""Shared pieces of the training scripts: DDP, seeding, optimiser groups, the cosine schedule,
atomic checkpoints with RNG state, JSONL logging and one training epoch.

The recipe is seed 003 §4.2 as its official code runs it: AdamW (lr 1e-4, betas (0.9, 0.95),
weight decay 0.01), a cosine schedule stepped per iteration down to 1e-8, gradient clipping at
1.0. Norms, biases and embeddings get no weight decay (the usual convention; open_clip does the
same).
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

from .fileio import atomic_path, write_json


# ----------------------------------------------------------------------------- distributed
def setup_distributed(device_flag: str = "auto") -> tuple[int, int, torch.device]:
    """(rank, world_size, device) from torchrun's environment; a single process otherwise."""
    want_cuda = device_flag.startswith("cuda") or (device_flag == "auto" and torch.cuda.is_available())
    if "RANK" not in os.environ:
        return 0, 1, torch.device("cuda" if want_cuda else device_flag if device_flag != "auto" else "cpu")
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local = int(os.environ.get("LOCAL_RANK", 0))
    dist.init_process_group("nccl" if want_cuda else "gloo")
    if want_cuda:
        torch.cuda.set_device(local)
        return rank, world, torch.device("cuda", local)
    return rank, world, torch.device("cpu")


def gather_list(values: list) -> list:
    """Concatenate a per-rank Python list over all ranks (identity without DDP)."""
    if not (dist.is_available() and dist.is_initialized()):
        return list(values)
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, list(values))
    return [v for part in out for v in part]


def all_finite(loss: torch.Tensor) -> bool:
    """True when the loss is finite on every rank: one rank's NaN must stop all of them, or the
    others would wait in the next all-reduce until the timeout."""
    ok = torch.isfinite(loss.detach()).float().reshape(1)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(ok, op=dist.ReduceOp.MIN)
    return bool(ok.item())


def barrier():
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


# ----------------------------------------------------------------------------- reproducibility
def seed_everything(seed: int):
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def epoch_seed(seed: int, epoch: int) -> int:
    """Every epoch re-seeds from (seed, epoch), so a resumed run replays the same batches,
    augmentations and dropout masks as an uninterrupted one."""
    return seed * 100_003 + epoch


def rng_state() -> dict:
    # numpy's state goes in as a tensor: weights_only=True loading refuses numpy arrays.
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict):
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ----------------------------------------------------------------------------- optimisation
def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Trainable parameters, split so that norms, biases and embeddings get no weight decay."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        skip = p.ndim < 2 or "embedding" in name or "ln_" in name or "norm" in name
        (no_decay if skip else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model, lr=1e-4, betas=(0.9, 0.95), weight_decay=0.01):
    groups = param_groups(model, weight_decay)
    if not any(g["params"] for g in groups):
        raise ValueError("no trainable parameters: check --adapter / --adapter-train")
    return torch.optim.AdamW(groups, lr=lr, betas=betas)


def cosine_schedule(optimizer, total_steps: int, min_lr: float = 1e-8):
    """Cosine annealing per step from each group's lr to min_lr (CosineAnnealingLR's curve)."""
    base = optimizer.param_groups[0]["lr"]
    floor = min_lr / base

    def factor(step):
        t = min(step, total_steps) / max(1, total_steps)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def freeze_blocks_after(visual: nn.Module, deepest: int):
    """Blocks past the deepest one a head reads never run (pool=False), so their adapters would
    get no gradient; keeping them out of the optimiser spares DDP find_unused_parameters."""
    for i, block in enumerate(visual.transformer.resblocks):
        if i > deepest:
            block.requires_grad_(False)
    for p in (visual.ln_post.weight, visual.ln_post.bias, visual.proj):
        p.requires_grad_(False)


def autocast(device: torch.device, enabled: bool):
    """bf16 autocast on CUDA; on the CPU autocast is slower than fp32, so it is a no-op there."""
    if enabled and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def train_epoch(model, loader, loss_fn, optimizer, scheduler, device, target: str, amp=False,
                grad_clip=1.0, desc="train", show=True) -> float:
    """One pass over `loader`; returns the mean loss. A non-finite loss stops the run."""
    model.train()
    total, n = 0.0, 0
    for batch in tqdm(loader, desc=desc, leave=False, disable=not show):
        x, y = batch["image"].to(device), batch[target].to(device)
        with autocast(device, amp):
            loss = loss_fn(model(x).float(), y)
        if not all_finite(loss):
            raise FloatingPointError(f"loss became {loss.item()} in {desc}; the last good "
                                     f"checkpoint is kept. Lower --lr or check the data.")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if grad_clip:
            torch.nn.utils.clip_grad_norm_(
                [p for g in optimizer.param_groups for p in g["params"]], grad_clip)
        optimizer.step()
        scheduler.step()
        total, n = total + loss.item() * len(x), n + len(x)
    return total / max(n, 1)


# ----------------------------------------------------------------------------- files
def save_checkpoint(path, obj: dict):
    """torch.save to a temporary file, then os.replace: a killed run never leaves half a file."""
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def load_checkpoint(path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"cannot read checkpoint {path} (truncated, or not written by "
                         f"clip_us): {e}") from e


class JsonlLogger:
    """Appends one JSON object per line; a no-op on ranks other than 0."""

    def __init__(self, path, enabled: bool = True):
        self.path, self.enabled = Path(path), enabled
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def log(self, **record):
        if self.enabled:
            record.setdefault("time", round(time.time(), 3))
            with open(self.path, "a") as f:
                f.write(json.dumps(record, default=float) + "\n")


def read_jsonl(path) -> list[dict]:
    path = Path(path)
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] \
        if path.exists() else []


def row_name(backbone: str, adapter: str, finetuned: bool) -> str:
    """The paper's row label, e.g. "CLIP (Mona, ft.)"."""
    if backbone != "clip":
        return backbone
    name = {"none": "vanilla", "lora": "LoRA", "mona": "Mona"}[adapter]
    return f"CLIP ({name}{', ft.' if finetuned else ''})"


def default_out_dir(script: str, dataset: str, row: str) -> Path:
    slug = row.replace("CLIP (", "clip-").replace(", ", "-").replace(")", "").replace(".", "")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return Path("runs") / script / f"{dataset}-{slug.lower().replace(' ', '-')}-{stamp}"


# ----------------------------------------------------------------------------- configuration
@dataclass
class SupervisedConfig:
    """Defaults shared by train_seg.py and train_cls.py: seed 003 §4.2 and its official code."""
    dataset: str = field(default="phantom", metadata={"help": "busi, tn3k, ddti, prostate, "
                                                      "folder, nextgen, phantom"})
    data_root: str = field(default="", metadata={"help": "dataset folder ('' = default)"})
    nextgen_name: str = field(default="", metadata={"help": "<DS> for the nextgen layout"})
    phantom_n: int = field(default=200, metadata={"help": "phantom: number of images"})
    phantom_size: int = field(default=256, metadata={"help": "phantom: image side in pixels"})
    keep_normal: bool = field(default=False, metadata={"help": "BUSI normal images as class 2"})
    image_size: int = 224
    clip_norm: bool = field(default=True, metadata={"help": "CLIP mean/std; --no-clip-norm "
                                                    "feeds [0,1] pixels as the official code"})
    skip_bad: bool = False
    workers: int = 2
    arch: str = field(default="ViT-B/16", metadata={"help": "ViT-B/16, tiny, ..."})
    backbone: str = "clip"
    weights: str = field(default="ViT-B/16", metadata={"help": "name, path, or none"})
    adapter: str = field(default="mona", metadata={"choices": ["none", "lora", "mona"]})
    adapter_train: str = field(default="yes", metadata={"choices": ["yes", "no"]})
    init: str = field(default="", metadata={"help": "checkpoint with adapter weights (ft. rows)"})
    layers: list = field(default_factory=lambda: [3, 6, 9])
    reduce_dim: int = 512
    fuse: str = field(default="sum", metadata={"choices": ["sum", "concat"]})
    seeds: list = field(default_factory=lambda: [1, 2, 3])
    epochs: int = 200
    eval_every: int = 10
    patience: int = 15
    batch_size: int = 32
    lr: float = 1e-4
    betas: list = field(default_factory=lambda: [0.9, 0.95])
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    amp: bool = field(default=True, metadata={"help": "bf16 autocast on CUDA (no-op on CPU)"})
    device: str = "auto"
    out_dir: str = ""
    resume: bool = False
    eval_only: bool = False
    checkpoint: str = field(default="", metadata={"help": "with --eval-only"})
    n_figures: int = 8
    seed_now: int = field(default=0, metadata={"cli": False})  # the seed being run


def parse_config(cls, argv=None, description: str = ""):
    """An argparse CLI generated from a config dataclass: every field becomes `--field-name`,
    typed by its default. Returns an instance with the overrides applied."""
    import argparse
    import dataclasses
    parser = argparse.ArgumentParser(description=description)
    for f in dataclasses.fields(cls):
        if f.metadata.get("cli") is False:
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        flag = "--" + f.name.replace("_", "-")
        helptext = f.metadata.get("help", "")
        if isinstance(default, bool):
            parser.add_argument(flag, default=default, action=argparse.BooleanOptionalAction,
                                help=helptext)
        elif isinstance(default, (list, tuple)):
            kind = type(default[0]) if default else str
            parser.add_argument(flag, default=list(default), nargs="+", type=kind, help=helptext)
        else:
            kind = type(default) if default is not None else str
            choices = f.metadata.get("choices")
            parser.add_argument(flag, default=default, type=kind, choices=choices, help=helptext)
    return cls(**vars(parser.parse_args(argv)))


# ----------------------------------------------------------------------------- checkpoints of task models
ADAPTER_KEYS = ("lora_", "mona")


def split_state(model: nn.Module, backbone_trained: bool) -> dict:
    """A task model's tensors in DESIGN.md's checkpoint layout: adapters (keys as in a CLIP model,
    "visual.…", so `--init` works across scripts), head, and the backbone only if it trained."""
    sd = model.state_dict()
    out = {"adapter_state_dict": {k: v for k, v in sd.items() if any(a in k for a in ADAPTER_KEYS)},
           "head_state_dict": {k[len("head."):]: v for k, v in sd.items() if k.startswith("head.")}}
    if backbone_trained:
        out["model_state_dict"] = {k: v for k, v in sd.items() if not k.startswith("head.")}
    return out


def restore_state(model: nn.Module, ckpt: dict):
    """Inverse of split_state. Differing adapter settings or keys are errors naming them."""
    if "adapter_config" in ckpt:
        from .adapters import AdapterConfig, check_adapter_config
        check_adapter_config(AdapterConfig.from_dict(dict(ckpt["adapter_config"])), model)
    if "model_state_dict" in ckpt:
        model.load_state_dict(ckpt["model_state_dict"], strict=False)
    missing = [k for k in ckpt["adapter_state_dict"] if k not in model.state_dict()]
    if missing:
        raise KeyError(f"checkpoint adapter keys not in this model (adapter settings differ?): "
                       f"{missing[:5]}{' …' if len(missing) > 5 else ''}")
    model.load_state_dict(ckpt["adapter_state_dict"], strict=False)
    model.head.load_state_dict(ckpt["head_state_dict"])


def fit(model, train_loader, evaluate, loss_fn, cfg, ckpt_dir: Path, extra: dict, log,
        device, is_main: bool, target: str) -> dict:
    """Train with per-epoch checkpoints, validation every `cfg.eval_every` epochs (and the last),
    early stopping after `cfg.patience` validations without improvement, and `--resume`.

    `evaluate(model) -> (score, metrics)`; higher score is better. Returns the best record and
    leaves the best weights loaded in `model`.
    """
    core = model.module if hasattr(model, "module") else model
    opt = build_optimizer(core, cfg.lr, tuple(cfg.betas), cfg.weight_decay)
    sched = cosine_schedule(opt, len(train_loader) * cfg.epochs)
    state = {"epoch": 0, "best_score": -math.inf, "best_epoch": -1, "bad": 0}
    last, best = ckpt_dir / "last.pt", ckpt_dir / "best.pt"
    if cfg.resume and last.exists():
        ck = load_checkpoint(last)
        restore_state(core, ck)
        opt.load_state_dict(ck["optimizer"])
        sched.load_state_dict(ck["scheduler"])
        set_rng_state(ck["rng"])
        state = ck["state"]
        print(f"resumed from {last} at epoch {state['epoch']}")
    for epoch in range(state["epoch"], cfg.epochs):
        if state["bad"] >= cfg.patience:
            break
        seed_everything(epoch_seed(cfg.seed_now, epoch))
        train_loader.sampler.set_epoch(epoch)
        loss = train_epoch(model, train_loader, loss_fn, opt, sched, device, target, cfg.amp,
                           cfg.grad_clip, desc=f"epoch {epoch + 1}/{cfg.epochs}", show=is_main)
        record = {"seed": cfg.seed_now, "epoch": epoch + 1, "loss": loss,
                  "lr": sched.get_last_lr()[0]}
        if (epoch + 1) % cfg.eval_every == 0 or epoch + 1 == cfg.epochs:
            score, metrics = evaluate(model)
            score = -math.inf if score is None or math.isnan(score) else score  # no finite value
            record["val"] = metrics
            improved = score > state["best_score"] or state["best_epoch"] < 0  # first is best
            state.update(best_score=score, best_epoch=epoch + 1, bad=0) if improved \
                else state.update(bad=state["bad"] + 1)
            if improved and is_main:
                save_checkpoint(best, {**extra, **split_state(core, extra["backbone_trained"]),
                                       "epoch": epoch + 1, "val": metrics})
        state["epoch"] = epoch + 1
        if is_main:  # checkpoint before the log line, so a resumed run never logs an epoch twice
            save_checkpoint(last, {**extra, **split_state(core, extra["backbone_trained"]),
                                   "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                                   "rng": rng_state(), "state": state, "epoch": epoch + 1})
        log(**record)
    barrier()
    restore_state(core, load_checkpoint(best))
    return state


# ----------------------------------------------------------------------------- script helpers
def eval_only_config(cfg, cls, ckpt: dict):
    """For --eval-only: the checkpoint's config decides the model, the CLI decides the data."""
    import dataclasses
    names = {f.name for f in dataclasses.fields(cls)}
    keep = {k: getattr(cfg, k) for k in (
        "dataset", "data_root", "nextgen_name", "out_dir", "eval_only", "checkpoint", "device",
        "workers", "skip_bad", "batch_size", "amp", "n_figures", "phantom_n", "phantom_size")}
    saved = cls(**{k: v for k, v in ckpt["config"].items() if k in names})
    # The checkpoint already holds the adapter weights: its --init file is not needed again.
    keep.update(init="", seeds=[saved.seed_now], seed_now=saved.seed_now)
    return dataclasses.replace(saved, **keep)


def shard(dataset, rank: int, world: int):
    """Rank r takes items r, r+world, ...: no padding, so no image is counted twice."""
    from torch.utils.data import Subset
    return Subset(dataset, list(range(rank, len(dataset), world)))


def summarize_seeds(per_seed: list[dict], keys) -> dict:
    """{metric: {mean, std, per_seed}} over the seeds' test means, as the tables report them.
    A seed without a finite value (None: e.g. no test image had a finite HD95) is left out of
    the mean and shows as None in per_seed; a metric no seed has is None."""
    out = {}
    for k in keys:
        vals = [None if r[k] is None else float(r[k]) for r in per_seed]
        finite = [v for v in vals if v is not None and math.isfinite(v)]
        out[k] = {"mean": float(np.mean(finite)) if finite else None,
                  "std": float(np.std(finite)) if finite else None, "per_seed": vals}
    return out


def fmt(value) -> str:
    return "n/a" if value is None else f"{value:.4f}"


# ----------------------------------------------------------------------------- one supervised run
@dataclass
class Run:
    """What a supervised script knows once it has started: config, ranks, output folder, log."""
    cfg: object
    rank: int
    world: int
    device: torch.device
    row: str
    out: Path
    log: object
    ckpt: dict | None = None  # the --eval-only checkpoint

    @property
    def main(self) -> bool:
        return self.rank == 0


def start_run(cls, script: str, description: str, argv=None) -> Run:
    """Parse the CLI, join DDP, resolve --eval-only, print and save the resolved config."""
    import dataclasses
    cfg = parse_config(cls, argv, description)
    rank, world, device = setup_distributed(cfg.device)
    ckpt = None
    if cfg.eval_only:
        ckpt = load_checkpoint(cfg.checkpoint)
        cfg = eval_only_config(cfg, cls, ckpt)
    row = row_name(cfg.backbone, cfg.adapter, bool(cfg.init))
    out = Path(cfg.out_dir or default_out_dir(script, cfg.dataset, row))
    if rank == 0:
        print(json.dumps(dataclasses.asdict(cfg), indent=2))
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / "config.json", dataclasses.asdict(cfg))
    log = JsonlLogger(out / "log.jsonl", enabled=rank == 0).log
    return Run(cfg, rank, world, device, row, out, log, ckpt)


def supervised_data(run: Run, task: str):
    """(train, val, test, info) for a run; with --eval-only the whole data set is the test set,
    as for an external set such as LN-2."""
    from .data import DataConfig, build_datasets
    cfg = run.cfg
    data_cfg = DataConfig(
        dataset=cfg.dataset, root=cfg.data_root or None, task=task, size=cfg.image_size,
        clip_norm=cfg.clip_norm, skip_bad=cfg.skip_bad, nextgen_name=cfg.nextgen_name or None,
        split_path=str(run.out / "split.json"), train_aug=not cfg.eval_only,
        keep_normal=cfg.keep_normal, phantom_n=cfg.phantom_n, phantom_size=cfg.phantom_size)
    # Rank 0 writes the phantom and split.json; the other ranks then read them.
    if not run.main:
        barrier()
    train, val, test, info = build_datasets(data_cfg)
    if run.main:
        barrier()
    if cfg.eval_only:
        test = torch.utils.data.ConcatDataset([train, val, test])
    if run.main:
        print(f"data: {len(train)} train / {len(val)} val / {len(test)} test ({info})")
    return train, val, test, info


def train_seed(run: Run, model, train_set, evaluate, loss_fn, adapter_cfg, target: str, version):
    """Fit one seed: DistributedSampler (also single-process, for per-epoch determinism),
    DDP when world > 1, checkpoints under out/seed<N>/. Leaves the best weights in `model`."""
    import dataclasses
    from torch.nn.parallel import DistributedDataParallel as DDP
    from torch.utils.data import DataLoader, DistributedSampler
    cfg = run.cfg
    sampler = DistributedSampler(train_set, run.world, run.rank, shuffle=True, seed=cfg.seed_now)
    # drop_last avoids a tiny last batch, but never when a rank's share is a single batch.
    loader = DataLoader(train_set, batch_size=cfg.batch_size, sampler=sampler,
                        num_workers=cfg.workers, drop_last=len(sampler) > cfg.batch_size)
    if len(loader) == 0:
        raise ValueError(f"no training batch: {len(train_set)} training images over "
                         f"{run.world} ranks; add data or lower --batch-size")
    net = DDP(model) if run.world > 1 else model
    extra = {"config": dataclasses.asdict(cfg), "adapter_config": dataclasses.asdict(adapter_cfg),
             "backbone_trained": False, "version": version}
    return fit(net, loader, evaluate, loss_fn, cfg, run.out / f"seed{cfg.seed_now}", extra,
               run.log, run.device, run.main, target)


def save_loss_curves(run: Run, ylabel: str):
    """loss.svg from log.jsonl, one curve per seed."""
    from .viz import save_curves_svg
    history = read_jsonl(run.out / "log.jsonl")
    curves = {f"seed {s}": [(r["epoch"], r["loss"]) for r in history
                            if r.get("seed") == s and "loss" in r] for s in run.cfg.seeds}
    curves = {k: v for k, v in curves.items() if v}
    if curves:
        save_curves_svg(curves, run.out / "loss.svg", "training loss", "epoch", ylabel)
