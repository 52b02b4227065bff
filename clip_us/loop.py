"""The one training loop: optimiser and schedule, epochs, validation, early stopping, checkpoints.

Every training script calls `train` (train_seg.py, train_cls.py, train_contrastive.py). Two
short fits of evaluate.py run their own steps instead: the logistic-regression probe
(evaluation/probe.py, L-BFGS) and the end-to-end few-shot heads (evaluation/protocol.py). The
script supplies what differs:

- `loss_step(batch, model) -> loss`: the forward and the loss of one batch (the loop does not
  know what a batch holds);
- `evaluate(model) -> (score, metrics)`: the validation score that picks the best checkpoint
  (`best="max"` for a metric such as Dice, `best="min"` for a validation loss);
- `Settings`: the recipe. The ultrasound-CLIP paper (Qu et al., "Adapting Vision-Language
  Foundation Model for Next Generation Medical Ultrasound Image Analysis") §4.2 and its official
  code: AdamW (lr 1e-4, betas (0.9, 0.95), weight decay 0.01), cosine schedule per iteration down
  to 1e-8, batch 32. EchoCare-CLIP ("Ultrasound Vision-Language Alignment via Contrastive
  Learning") steps its schedule per epoch; the official contrastive code clips gradients at 1.0
  and skips batches with a non-finite loss.

Checkpoints (`out_dir/best.pt`, `out_dir/last.pt`) are written atomically by rank 0 and hold the
model's tensors in the adapters.checkpoint_tensors layout plus `extra` (config, version, ...);
last.pt adds the optimiser, scheduler, RNG state and loop state for `resume`. Every epoch re-seeds
from (seed, epoch), so a resumed run's losses equal an uninterrupted run's.
"""
from __future__ import annotations

import atexit
import math
import os
import random
import sys
import time
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, Subset
from tqdm import tqdm

from .adapters import checkpoint_tensors, load_task_state
from .fileio import load_checkpoint, save_checkpoint
from .precision import autocast


# ----------------------------------------------------------------------------- random-number state
# Seeding, capture, restore.
def seed_everything(seed: int):
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def epoch_seed(seed: int, epoch: int) -> int:
    """The seed of one epoch of one run: resuming at any epoch reproduces it."""
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


# ----------------------------------------------------------------------------- DDP
# torchrun's process group, gathering, agreeing on a finite loss.
def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _destroy_process_group():
    if is_distributed():
        dist.destroy_process_group()


def resolve_device(flag: str = "auto") -> torch.device:
    """--device: auto = CUDA when there is one; a bad name or a missing GPU is a user error."""
    if flag == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(flag)
    except RuntimeError:
        raise ValueError(f"--device {flag}: not a device (cpu, cuda, cuda:1, ...)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {flag}: this machine has no CUDA GPU; use --device cpu")
    return device


def setup_distributed(device_flag: str = "auto") -> tuple[int, int, torch.device]:
    """(rank, world_size, device) from torchrun's environment; a single process otherwise.
    Under torchrun, a CUDA --device means each rank's own GPU (LOCAL_RANK)."""
    device = resolve_device(device_flag)
    want_cuda = device.type == "cuda"
    if "RANK" not in os.environ:
        return 0, 1, device
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local = int(os.environ.get("LOCAL_RANK", 0))
    if not is_distributed():
        hook = sys.excepthook
        dist.init_process_group("nccl" if want_cuda else "gloo")
        if hook is not sys.__excepthook__:
            # torch wraps the hook to prefix its stderr with the rank, buffering it until the
            # hook returns; ours (config.report_errors) exits inside, so its one-line error was
            # lost under torchrun. Ours stays: its line names the error, not the rank.
            sys.excepthook = hook
        # An orderly teardown when the script ends: left to interpreter shutdown, gloo's threads
        # can outlive their process group and abort the rank ("terminate called without an
        # active exception"), failing a run whose work was done.
        atexit.register(_destroy_process_group)
    if want_cuda:
        torch.cuda.set_device(local)
        return rank, world, torch.device("cuda", local)
    return rank, world, torch.device("cpu")


def gather_list(values: list) -> list:
    """Concatenate a per-rank Python list over all ranks (identity without DDP)."""
    if not is_distributed():
        return list(values)
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, list(values))
    return [v for part in out for v in part]


def all_finite(loss: torch.Tensor) -> bool:
    """True when the loss is finite on every rank: one rank's NaN must stop (or skip) all of them,
    or the others would wait in the next all-reduce until the timeout."""
    ok = torch.isfinite(loss.detach()).all().float().reshape(1)
    if is_distributed():
        dist.all_reduce(ok, op=dist.ReduceOp.MIN)
    return bool(ok.item())


def barrier():
    if is_distributed():
        dist.barrier()


def shard(dataset, rank: int, world: int):
    """Rank r takes items r, r+world, ...: no padding, so no image is counted twice."""
    return Subset(dataset, list(range(rank, len(dataset), world)))


# ----------------------------------------------------------------------------- the recipe
@dataclass
class Settings:
    """The recipe of one training run; `Settings.of(cfg)` takes the fields a script config has."""
    epochs: int = 200
    lr: float = 1e-4
    betas: tuple = (0.9, 0.95)
    weight_decay: float = 0.01
    decay: str = "all"          # "all" trainable parameters (official code) | "matrices" (no decay
    #                             on norms, biases and embeddings: open_clip's convention)
    schedule: str = "iter"      # cosine stepped per "iter" (ultrasound-CLIP) or "epoch" (EchoCare)
    min_lr: float = 1e-8
    grad_clip: float = 0.0      # max gradient norm; 0 = no clipping
    eval_every: int = 10        # validate every N epochs, and after the last one
    eval_at: str = "every"      # "every": after epochs N, 2N, ... (1-based); "official": after
    #                             epochs N+1, 2N+1, ..., the official seg/cls scripts' rule
    patience: int = 15          # stop after N validations without improvement
    best: str = "max"           # "max": highest validation score wins; "min": lowest
    nonfinite: str = "stop"     # a non-finite loss: "stop" the run, or "skip" the batch
    max_skips: int = 5          # with "skip": this many non-finite batches in a row stop the run
    amp: bool = True            # bf16 autocast on CUDA (a no-op on the CPU)
    metric: str = "score"       # the score's name on the console
    unit: str = "img"           # what a batch item is, for the progress bar's rate ("pairs")

    def __post_init__(self):
        for name, allowed in (("decay", ("all", "matrices")), ("schedule", ("iter", "epoch")),
                              ("best", ("max", "min")), ("nonfinite", ("stop", "skip")),
                              ("eval_at", ("every", "official"))):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")

    @classmethod
    def of(cls, cfg, **fixed) -> "Settings":
        """Settings from any config object holding some of these fields, `fixed` on top."""
        have = {f.name: getattr(cfg, f.name) for f in fields(cls) if hasattr(cfg, f.name)}
        return cls(**{**have, **fixed})


# ----------------------------------------------------------------------------- optimisation
def param_groups(model: nn.Module, weight_decay: float, decay: str = "all") -> list[dict]:
    """Trainable parameters in two groups; with decay="matrices", norms, biases and embeddings
    go in the group without weight decay (the usual convention; open_clip does the same)."""
    on, off = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        skip = decay == "matrices" and (p.ndim < 2 or "embedding" in name or "ln_" in name
                                        or "norm" in name)
        (off if skip else on).append(p)
    return [{"params": on, "weight_decay": weight_decay}, {"params": off, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, s: Settings) -> torch.optim.AdamW:
    groups = param_groups(model, s.weight_decay, s.decay)
    if not any(g["params"] for g in groups):
        raise ValueError("no trainable parameters: check --adapter / --adapter-train")
    return torch.optim.AdamW(groups, lr=s.lr, betas=tuple(s.betas))


def cosine_schedule(optimizer, total_steps: int, min_lr: float = 1e-8):
    """Cosine annealing per step from each group's lr to min_lr (CosineAnnealingLR's curve)."""
    floor = min_lr / optimizer.param_groups[0]["lr"]

    def factor(step):
        t = min(step, total_steps) / max(1, total_steps)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def train_loader(dataset, batch_size: int, workers: int, seed: int, rank: int = 0,
                 world: int = 1) -> DataLoader:
    """Shuffled batches through a DistributedSampler (in one process too: its set_epoch makes
    each epoch's order a function of (seed, epoch), which resume relies on)."""
    sampler = DistributedSampler(dataset, world, rank, shuffle=True, seed=seed)
    # drop_last avoids a tiny last batch, but never when a rank's share is a single batch.
    loader = DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers,
                        drop_last=len(sampler) > batch_size)
    if len(loader) == 0:
        raise ValueError(f"no training batch: {len(dataset)} training images over {world} "
                         f"ranks; add data or lower --batch-size")
    return loader


# ----------------------------------------------------------------------------- loop helpers
def batch_size(batch) -> int:
    """Items in a batch: the length of its first tensor (dict, tuple or tensor batches)."""
    first = next(iter(batch.values())) if isinstance(batch, dict) else \
        batch[0] if isinstance(batch, (tuple, list)) else batch
    return len(first)


def is_better(score, best, mode: str) -> bool:
    """A score without a finite value (None or NaN) is never better than a finite one."""
    if score is None or math.isnan(score):
        return False
    return best is None or (score > best if mode == "max" else score < best)


def on_nonfinite(loss, s: Settings, in_row: int, where: str) -> int:
    """Count a skipped batch, or stop: the last good checkpoint is kept either way."""
    if s.nonfinite == "stop" or in_row + 1 >= s.max_skips:
        why = "" if s.nonfinite == "stop" else f" in {in_row + 1} batches in a row"
        raise FloatingPointError(f"loss became {loss.item()}{why} in {where}; the last good "
                                 f"checkpoint is kept. Lower --lr or check the data.")
    return in_row + 1


def model_tensors(model: nn.Module) -> dict:
    """The model's checkpoint entries. A model that owns its layout (echocare.EchoCareCLIP, whose
    frozen encoders are named and hashed instead of copied) says what to store."""
    if hasattr(model, "checkpoint_tensors"):
        return model.checkpoint_tensors()
    return checkpoint_tensors(model)


def restore_tensors(model: nn.Module, ck: dict) -> None:
    if hasattr(model, "load_checkpoint_tensors"):
        model.load_checkpoint_tensors(ck)
    else:
        load_task_state(model, ck)


def resume_from(path: Path, model, opt, sched) -> dict:
    ck = load_checkpoint(path)
    restore_tensors(model, ck)
    opt.load_state_dict(ck["optimizer"])
    sched.load_state_dict(ck["scheduler"])
    set_rng_state(ck["rng"])
    print(f"resumed from {path} at epoch {ck['state']['epoch']}")
    return ck["state"]


# ----------------------------------------------------------------------------- the loop

def validates(epoch: int, s: Settings) -> bool:
    """Whether the 0-based `epoch` ends with a validation: always after the last one; else every
    s.eval_every epochs, counted as the official seg/cls scripts count them (`epoch > 0 and
    epoch % 10 == 0` on 0-based epochs: after epochs 11, 21, ...) or from 1 (10, 20, ...)."""
    if epoch + 1 == s.epochs:
        return True
    if s.eval_at == "official":
        return epoch > 0 and epoch % s.eval_every == 0
    return (epoch + 1) % s.eval_every == 0


def train(model: nn.Module, loader, loss_step, evaluate, *, seed: int, out_dir, settings: Settings,
          extra: dict | None = None, log=lambda **record: None, is_main: bool = True,
          resume: bool = False) -> dict:
    """Train `model` in place; returns the loop state and leaves the best weights loaded."""
    s, extra, device = settings, extra or {}, next(model.parameters()).device
    net = DistributedDataParallel(model) if is_distributed() else model
    opt = build_optimizer(model, s)
    sched = cosine_schedule(opt, s.epochs * (len(loader) if s.schedule == "iter" else 1), s.min_lr)
    params = [p for g in opt.param_groups for p in g["params"]]
    state = {"epoch": 0, "best_score": None, "best_epoch": -1, "bad": 0, "skipped": 0}
    last, best = Path(out_dir) / "last.pt", Path(out_dir) / "best.pt"
    if resume and last.exists():
        state = resume_from(last, model, opt, sched)
    in_row = 0  # non-finite batches in a row
    for epoch in range(state["epoch"], s.epochs):
        if state["bad"] >= s.patience:
            break
        seed_everything(epoch_seed(seed, epoch))
        if hasattr(loader, "sampler") and hasattr(loader.sampler, "set_epoch"):
            loader.sampler.set_epoch(epoch)
        net.train()
        total, n = 0.0, 0
        bar = tqdm(loader, desc=f"epoch {epoch + 1}/{s.epochs}", leave=False, disable=not is_main)
        started = time.perf_counter()
        for batch in bar:
            with autocast("bf16" if s.amp else "fp32", device, cuda_only=True):
                loss = loss_step(batch, net)
            if not all_finite(loss):
                in_row = on_nonfinite(loss, s, in_row, f"epoch {epoch + 1}")
                state["skipped"] += 1
                continue
            in_row = 0
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if s.grad_clip:
                nn.utils.clip_grad_norm_(params, s.grad_clip)
            opt.step()
            if s.schedule == "iter":
                sched.step()
            k = batch_size(batch)
            total, n = total + loss.item() * k, n + k
            rate = n / max(time.perf_counter() - started, 1e-9)
            bar.set_postfix({"loss": f"{total / n:.4f}", f"{s.unit}/s": f"{rate:.1f}"})
        if s.schedule == "epoch":
            sched.step()
        record = {"seed": seed, "epoch": epoch + 1, "loss": total / n if n else math.nan,
                  "lr": sched.get_last_lr()[0]}
        if state["skipped"]:
            record["skipped_batches"] = state["skipped"]
        if validates(epoch, s):
            score, metrics = evaluate(model)
            record["val"] = metrics
            improved = is_better(score, state["best_score"], s.best) or state["best_epoch"] < 0
            if improved:  # the first validation is the best so far, even without a finite score
                finite = score is not None and not math.isnan(score)
                state.update(best_score=score if finite else None, best_epoch=epoch + 1, bad=0)
                if is_main:
                    save_checkpoint(best, {**extra, **model_tensors(model),
                                           "epoch": epoch + 1, "val": metrics})
            else:
                state["bad"] += 1
            if is_main:
                tqdm.write(f"epoch {epoch + 1}: loss {record['loss']:.4f}, val {s.metric} "
                           f"{'n/a' if score is None else f'{score:.4f}'}"
                           f"{' (best)' if improved else ''}")
        state["epoch"] = epoch + 1
        if is_main:  # checkpoint before the log line, so a resumed run never logs an epoch twice
            save_checkpoint(last, {**extra, **model_tensors(model),
                                   "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                                   "rng": rng_state(), "state": state, "epoch": epoch + 1})
        log(**record)
    barrier()
    restore_tensors(model, load_checkpoint(best))
    return state
