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

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, DistributedSampler, Subset

import clip_us
from clip_us import engine, metrics, tables, viz
from clip_us.adapters import AdapterConfig, format_count
from clip_us.backbone import make_task_model
from clip_us.data import DataConfig, build_datasets
from clip_us.losses import dice_ce_loss

SEG_METRICS = ("dice", "iou", "hd95", "asd_directed", "assd")


@dataclass
class Config(engine.SupervisedConfig):
    task: str = "seg"


# ----------------------------------------------------------------------------- setup
cfg = engine.parse_config(Config, description=__doc__.splitlines()[0])
rank, world, device = engine.setup_distributed(cfg.device)
main = rank == 0
if cfg.eval_only:
    ckpt = engine.load_checkpoint(cfg.checkpoint)
    cfg = engine.eval_only_config(cfg, Config, ckpt)
finetuned = bool(cfg.init)
row = engine.row_name(cfg.backbone, cfg.adapter, finetuned)
out = Path(cfg.out_dir or engine.default_out_dir("train_seg", cfg.dataset, row))
adapter_cfg = AdapterConfig(kind=cfg.adapter)
if main:
    print(json.dumps(dataclasses.asdict(cfg), indent=2))
    out.mkdir(parents=True, exist_ok=True)
    engine.write_json(out / "config.json", dataclasses.asdict(cfg))
log = engine.JsonlLogger(out / "log.jsonl", enabled=main).log

data_cfg = DataConfig(dataset=cfg.dataset, root=cfg.data_root or None, task="seg",
                      size=cfg.image_size, clip_norm=cfg.clip_norm, skip_bad=cfg.skip_bad,
                      nextgen_name=cfg.nextgen_name or None,
                      split_path=str(out / "split.json"), train_aug=True,
                      keep_normal=cfg.keep_normal, phantom_n=cfg.phantom_n,
                      phantom_size=cfg.phantom_size)
train_set, val_set, test_set, data_info = build_datasets(data_cfg)
if cfg.eval_only:  # an external test set (e.g. LN-2) is used whole
    test_set = torch.utils.data.ConcatDataset([train_set, val_set, test_set])
if main:
    print(f"data: {len(train_set)} train / {len(val_set)} val / {len(test_set)} test ({data_info})")


# ----------------------------------------------------------------------------- evaluation
@torch.no_grad()
def predict(model, dataset):
    """Yield (path, image tensor, gt mask, predicted mask) for this rank's shard."""
    model.eval()
    loader = DataLoader(engine.shard(dataset, rank, world), batch_size=cfg.batch_size, num_workers=cfg.workers)
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
    rows = engine.gather_list([{"path": p, **per_image(g, q)} for p, _, g, q in predict(model, dataset)])
    report = metrics.segmentation_report({k: [r[k] for r in rows] for k in SEG_METRICS})
    return report["dice"]["mean"], report


def save_figures(model, dataset, path):
    items = []
    for p, img, gt, pred in predict(model, Subset(dataset, range(min(cfg.n_figures, len(dataset))))):
        items.append({"image": img, "gt": gt, "pred": pred,
                      "label": f"{Path(p).stem} Dice {metrics.dice(pred, gt):.2f}"})
    viz.save_overlay_grid(items, path, normalized=cfg.clip_norm)


# ----------------------------------------------------------------------------- run each seed
per_seed, cache = [], {}
for seed in cfg.seeds:
    cfg.seed_now = seed
    model = make_task_model(cfg, "seg", adapter_cfg, cache, device, seed)
    if main:
        print(f"seed {seed}: {format_count(model)}")
    seed_dir = out / f"seed{seed}"
    if cfg.eval_only:
        engine.restore_state(model, ckpt)
    else:
        sampler = DistributedSampler(train_set, world, rank, shuffle=True, seed=seed)
        loader = DataLoader(train_set, batch_size=cfg.batch_size, sampler=sampler,
                            num_workers=cfg.workers, drop_last=len(train_set) > cfg.batch_size)
        net = DDP(model) if world > 1 else model
        extra = {"config": dataclasses.asdict(cfg), "adapter_config": dataclasses.asdict(adapter_cfg),
                 "backbone_trained": False, "version": clip_us.__version__}
        engine.fit(net, loader, lambda m: evaluate(model, val_set), dice_ce_loss, cfg, seed_dir,
                   extra, log, device, main, target="mask")
    _, report = evaluate(model, test_set)
    log(seed=seed, test=report)
    per_seed.append(report)
    if main:
        save_figures(model, test_set, out / f"overlays_seed{seed}.png")
        print(f"seed {seed} test: " + ", ".join(f"{k} {report[k]['mean']:.4f}" for k in SEG_METRICS))
    if cfg.eval_only:
        break

# ----------------------------------------------------------------------------- results
if main:
    results = {
        "script": "train_seg.py", "task": "seg", "dataset": cfg.dataset, "row": row,
        "backbone": cfg.backbone, "adapter": cfg.adapter, "init": cfg.init or None,
        "seeds": cfg.seeds[:len(per_seed)],
        "metrics": engine.summarize_seeds([{k: r[k]["mean"] for k in SEG_METRICS}
                                           for r in per_seed], SEG_METRICS),
        "units": {"dice": "fraction", "iou": "fraction", "hd95": "px", "asd_directed": "px",
                  "assd": "px"},
        "n_test": len(test_set), "n_dropped": {k: per_seed[0][k]["n_dropped"] for k in SEG_METRICS},
        "config": dataclasses.asdict(cfg), "version": clip_us.__version__,
    }
    tables.write_results(out, results)
    history = engine.read_jsonl(out / "log.jsonl")
    curves = {f"seed {s} loss": [(r["epoch"], r["loss"]) for r in history
                                 if r.get("seed") == s and "loss" in r] for s in cfg.seeds}
    if any(curves.values()):
        viz.save_curves_svg(curves, out / "loss.svg", "training loss", "epoch", "Dice-CE")
    print(f"results: {out / 'results.json'}")
    print(tables.row_csv(results))
