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

from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Subset

import clip_us
from clip_us import engine, metrics, tables, viz
from clip_us.adapters import AdapterConfig, format_count
from clip_us.backbone import make_task_model
from clip_us.losses import dice_ce_loss

SEG_METRICS = ("dice", "iou", "hd95", "asd_directed", "assd")
UNITS = {"dice": "fraction", "iou": "fraction", "hd95": "px", "asd_directed": "px", "assd": "px"}


@dataclass
class Config(engine.SupervisedConfig):
    task: str = "seg"


# ----------------------------------------------------------------------------- setup
run = engine.start_run(Config, "train_seg", __doc__.splitlines()[0])
cfg, device = run.cfg, run.device
train_set, val_set, test_set, data_info = engine.supervised_data(run, "seg")
adapter_cfg = AdapterConfig(kind=cfg.adapter)


# ----------------------------------------------------------------------------- evaluation
@torch.no_grad()
def predict(model, dataset, shard=True):
    """Yield (path, image tensor, gt mask, predicted mask) for this rank's shard (or all)."""
    model.eval()
    part = engine.shard(dataset, run.rank, run.world) if shard else dataset
    loader = DataLoader(part, batch_size=cfg.batch_size, num_workers=cfg.workers)
    for batch in loader:
        with engine.autocast(device, cfg.amp):
            pred = model(batch["image"].to(device)).argmax(1).cpu().numpy()
        for i in range(len(pred)):
            yield batch["path"][i], batch["image"][i], batch["mask"][i].numpy() > 0, pred[i] > 0


def per_image(gt, pred) -> dict:
    return {"dice": metrics.dice(pred, gt), "iou": metrics.iou(pred, gt),
            "hd95": metrics.hd95(pred, gt), "asd_directed": metrics.asd(pred, gt),
            "assd": metrics.assd(pred, gt)}


def evaluate(model, dataset) -> tuple[float, dict]:
    """Per-image metrics gathered over ranks, averaged; empty-mask images dropped and counted."""
    rows = engine.gather_list([{"path": p, **per_image(g, q)}
                               for p, _, g, q in predict(model, dataset)])
    report = metrics.segmentation_report({k: [r[k] for r in rows] for k in SEG_METRICS})
    return report["dice"]["mean"], report


def save_figures(model, dataset, path):
    """Fig. 4-style overlays of the first test cases: GT red, FP green, TP yellow."""
    first = Subset(dataset, range(min(cfg.n_figures, len(dataset))))
    items = [{"image": img, "gt": gt, "pred": pred,
              "label": f"{Path(p).stem} Dice {metrics.dice(pred, gt):.2f}"}
             for p, img, gt, pred in predict(model, first, shard=False)]
    viz.save_overlay_grid(items, path, normalized=cfg.clip_norm)


# ----------------------------------------------------------------------------- run each seed
seeds_run = cfg.seeds  # --eval-only: the checkpoint's own seed
per_seed, cache = [], {}
for seed in seeds_run:
    cfg.seed_now = seed
    model = make_task_model(cfg, "seg", adapter_cfg, cache, device, seed)
    if run.main:
        print(f"seed {seed}: {format_count(model)}")
    if cfg.eval_only:
        engine.restore_state(model, run.ckpt)
    else:
        engine.train_seed(run, model, train_set, lambda m: evaluate(model, val_set),
                          dice_ce_loss, adapter_cfg, "mask", clip_us.__version__)
    _, report = evaluate(model, test_set)
    run.log(seed=seed, test=report)
    per_seed.append(report)
    if run.main:
        save_figures(model, test_set, run.out / f"overlays_seed{seed}.png")
        print(f"seed {seed} test: " + ", ".join(f"{k} {engine.fmt(report[k]['mean'])}"
                                                for k in SEG_METRICS))

# ----------------------------------------------------------------------------- results
if run.main:
    results = {
        "script": "train_seg.py", "task": "seg", "dataset": cfg.dataset, "row": run.row,
        "backbone": cfg.backbone, "adapter": cfg.adapter, "init": cfg.init or None,
        "seeds": seeds_run,
        "metrics": engine.summarize_seeds([{k: r[k]["mean"] for k in SEG_METRICS}
                                           for r in per_seed], SEG_METRICS),
        "units": UNITS, "n_test": len(test_set),
        "n_dropped": {k: [r[k]["n_dropped"] for r in per_seed] for k in SEG_METRICS},
        "config": asdict(cfg), "version": clip_us.__version__,
    }
    tables.write_results(run.out, results)
    engine.save_loss_curves(run, "Dice-CE")
    print(f"results: {run.out / 'results.json'}")
    print(tables.row_csv(results))
