"""train_seg.py: one row of seed 003's Table 2 (lesion segmentation).

CLIP ViT-B/16's vision tower, with LoRA or Mona (or neither), blocks 3/6/9 fused by the feature
reducer, bilinear up-sampling and a 1x1 conv (§3.2). Dice-CE loss, AdamW, cosine schedule, best
validation Dice picks the checkpoint, seeds 1, 2, 3 averaged (§4.2). Which flags reproduce which
row is in the README.

    python train_seg.py --dataset busi --data-root data/BUSI --adapter mona
    torchrun --nproc_per_node 2 train_seg.py ...           # DDP (gloo on CPU, nccl on CUDA)
    python train_seg.py --eval-only --checkpoint runs/.../seed1/best.pt --data-root data/LN-2
"""
from __future__ import annotations

from dataclasses import asdict
from functools import partial
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Subset

import clip_us
from clip_us import loop, metrics, tables, viz
from clip_us.adapters import AdapterConfig, format_count, load_task_state
from clip_us.config import SupervisedConfig, parse_config
from clip_us.distributed import gather_list, shard
from clip_us.losses import dice_ce_loss
from clip_us.metrics import SEG_METRICS, SEG_UNITS
from clip_us.runs import fmt, save_loss_curves, start_run, summarize_seeds, supervised_data
from clip_us.taskmodel import make_task_model

# ----------------------------------------------------------------------------- setup
cfg = parse_config(SupervisedConfig, description=__doc__.splitlines()[0])
run = start_run(cfg, "train_seg")
cfg, device = run.cfg, run.device
train_set, val_set, test_set, _ = supervised_data(run, "seg")
adapter_cfg = AdapterConfig(kind=cfg.adapter)
settings = loop.Settings.of(cfg, metric="dice")


def loss_step(batch, model):
    """Dice-CE (MONAI's DiceCELoss as the official code sets it) on one batch."""
    logits = model(batch["image"].to(device)).float()  # [B, 2, H, W]
    return dice_ce_loss(logits, batch["mask"].to(device))


# ----------------------------------------------------------------------------- evaluation
@torch.no_grad()
def predict(model, dataset, sharded=True):
    """Yield (path, image tensor, gt mask, predicted mask) for this rank's shard (or all)."""
    model.eval()
    part = shard(dataset, run.rank, run.world) if sharded else dataset
    loader = DataLoader(part, batch_size=cfg.batch_size, num_workers=cfg.workers)
    for batch in loader:
        with loop.autocast(device, cfg.amp):
            pred = model(batch["image"].to(device)).argmax(1).cpu().numpy()
        for i in range(len(pred)):
            yield batch["path"][i], batch["image"][i], batch["mask"][i].numpy() > 0, pred[i] > 0


def evaluate(model, dataset) -> tuple[float, dict]:
    """Per-image metrics gathered over ranks, averaged; empty-mask images dropped and counted."""
    rows = gather_list([{"path": p, **metrics.per_image(q, g)}
                        for p, _, g, q in predict(model, dataset)])
    report = metrics.segmentation_report({k: [r[k] for r in rows] for k in SEG_METRICS})
    return report["dice"]["mean"], report


def save_figures(model, dataset, path):
    """Fig. 4-style overlays of the first test cases: GT red, FP green, TP yellow."""
    first = Subset(dataset, range(min(cfg.n_figures, len(dataset))))
    items = [{"image": img, "gt": gt, "pred": pred,
              "label": f"{Path(p).stem} Dice {metrics.dice(pred, gt):.2f}"}
             for p, img, gt, pred in predict(model, first, sharded=False)]
    viz.save_overlay_grid(items, path, normalized=cfg.clip_norm)


# ----------------------------------------------------------------------------- run each seed
per_seed, cache = [], {}
for seed in cfg.seeds:  # --eval-only: the checkpoint's own seed
    model = make_task_model(cfg, "seg", adapter_cfg, cache, device, seed)
    if run.main:
        print(f"seed {seed}: {format_count(model)}")
    if cfg.eval_only:
        load_task_state(model, run.ckpt)
    else:
        loader = loop.train_loader(train_set, cfg.batch_size, cfg.workers, seed, run.rank, run.world)
        loop.train(model, loader, loss_step, partial(evaluate, dataset=val_set), seed=seed,
                   out_dir=run.out / f"seed{seed}", settings=settings, log=run.log,
                   extra=run.checkpoint_extra(seed, adapter_config=asdict(adapter_cfg),
                                              version=clip_us.__version__),
                   is_main=run.main, resume=cfg.resume)
    _, report = evaluate(model, test_set)
    run.log(seed=seed, test=report)
    per_seed.append(report)
    if run.main:
        save_figures(model, test_set, run.out / f"overlays_seed{seed}.png")
        print(f"seed {seed} test: " + ", ".join(f"{k} {fmt(report[k]['mean'])}"
                                                for k in SEG_METRICS))

# ----------------------------------------------------------------------------- results
if run.main:
    results = {
        "script": "train_seg.py", "task": "seg", "dataset": cfg.dataset, "row": run.row,
        "backbone": cfg.backbone, "adapter": cfg.adapter, "init": cfg.init or None,
        "seeds": cfg.seeds,
        "metrics": summarize_seeds([{k: r[k]["mean"] for k in SEG_METRICS} for r in per_seed],
                                   SEG_METRICS),
        "units": SEG_UNITS, "n_test": len(test_set),
        "n_dropped": {k: [r[k]["n_dropped"] for r in per_seed] for k in SEG_METRICS},
        "config": asdict(cfg), "version": clip_us.__version__,
    }
    tables.write_results(run.out, results)
    save_loss_curves(run, "Dice-CE", "dice")
    print(f"results: {run.out / 'results.json'}")
    print(tables.row_csv(results))
