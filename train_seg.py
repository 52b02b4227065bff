"""train_seg.py: one row of Table 2 (lesion segmentation) of Qu et al., "Adapting Vision-Language
Foundation Model for Next Generation Medical Ultrasound Image Analysis" (the ultrasound-CLIP paper).

As its official code (jinggqu/NextGen-UIA) runs it: CLIP ViT-B/16's vision tower,
with LoRA or Mona (or neither), blocks 3/6/9 fused by the feature reducer, bilinear up-sampling
and a 1x1 conv (§3.2). Dice-CE loss, AdamW, cosine schedule, best
validation Dice picks the checkpoint, seeds 1, 2, 3 averaged (§4.2). The training loop itself is
clip_us/loop.py (`loop.train`); which flags reproduce which row is in docs/reproducing.md.
"""
from __future__ import annotations

from functools import partial
from pathlib import Path

from torch.utils.data import DataLoader, Subset

from clip_us import loop, metrics, viz
from clip_us.config import SupervisedConfig, parse_config
from clip_us.loop import gather_list, shard
from clip_us.losses import dice_ce_loss
from clip_us.metrics import SEG_METRICS, SEG_UNITS
from clip_us.runs import fmt, start_run, summarize_seeds, supervised_data, supervised_step

EXAMPLES = """examples:
  python train_seg.py --arch tiny --weights none --image-size 128 --phantom-n 120 --epochs 30 \\
      --eval-every 5 --seeds 1 --out-dir runs/demo       # a few minutes on a CPU, no download
  python train_seg.py --dataset busi --data-root data/BUSI --adapter mona
  torchrun --nproc_per_node 2 train_seg.py --dataset busi --data-root data/BUSI
  python train_seg.py --eval-only --checkpoint runs/demo/seed1/best.pt \\
      --dataset folder --data-root data/LN-2             # an external test set
"""

# ----------------------------------------------------------------------------- setup
cfg = parse_config(SupervisedConfig, description=__doc__.split("\n\n")[0], epilog=EXAMPLES)
run = start_run(cfg, "train_seg")
cfg, device, adapter_cfg = run.cfg, run.device, run.adapter_config()
train_set, val_set, test_set, info = supervised_data(run, "seg")
# Dice-CE: MONAI's DiceCELoss as the official code sets it.
loss_step = supervised_step(dice_ce_loss, "mask", device)


# ----------------------------------------------------------------------------- evaluation
def predict(model, dataset, sharded=True):
    """Yield (path, image tensor, gt mask, predicted mask) for this rank's shard (or all)."""
    model.eval()
    part = shard(dataset, run.rank, run.world) if sharded else dataset
    loader = DataLoader(part, batch_size=cfg.batch_size, num_workers=cfg.workers)
    for batch in loader:
        with run.inference(model):  # --precision, per batch: nothing stays switched between yields
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
per_seed = []
for seed in cfg.seeds:  # --eval-only: the checkpoint's own seed, its weights loaded
    model = run.task_model(seed, "seg", adapter_cfg)
    loader = None if cfg.eval_only else \
        loop.train_loader(train_set, cfg.batch_size, cfg.workers, seed, run.rank, run.world)
    run.begin()  # all of the above was validation: the run folder is made at the first batch
    if loader is not None:
        loop.train(model, loader, loss_step, partial(evaluate, dataset=val_set),
                   **run.train_args(seed, adapter_cfg, "dice"))
    _, report = evaluate(model, test_set)
    run.log(seed=seed, test=report)
    per_seed.append(report)
    if run.main:
        save_figures(model, test_set, run.out / f"overlays_seed{seed}.png")
        print(f"seed {seed} test: " + ", ".join(f"{k} {fmt(report[k]['mean'])}"
                                                for k in SEG_METRICS))

# ----------------------------------------------------------------------------- results
if run.main:
    means = summarize_seeds([{k: r[k]["mean"] for k in SEG_METRICS} for r in per_seed],
                            SEG_METRICS)
    dropped = {k: [r[k]["n_dropped"] for r in per_seed] for k in SEG_METRICS}
    run.finish(run.results("seg", means, SEG_UNITS, len(test_set), info, n_dropped=dropped),
               "Dice-CE", "dice")
