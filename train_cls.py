"""train_cls.py: one row of Table 3, supervised group (benign vs malignant), of Qu et al.,
"Adapting Vision-Language Foundation Model for Next Generation Medical Ultrasound Image Analysis"
(the ultrasound-CLIP paper).

As its official code (jinggqu/NextGen-UIA) runs it: CLIP ViT-B/16's vision tower
with LoRA or Mona (or neither), blocks 3/6/9 fused by the feature reducer, then the official
code's MLP head (`--cls-head mlp`) or the paper's pooling head
(`--cls-head pool`, §3.2). Focal loss as MONAI's FocalLoss(to_onehot_y=True), AdamW, cosine
schedule, best validation accuracy picks the checkpoint, seeds 1, 2, 3 averaged (§4.2).
Malignant (class 1) is the positive class for AUC, sensitivity and F1. The training loop itself
is clip_us/loop.py (`loop.train`); which flags reproduce which row is in docs/reproducing.md.
"""
from __future__ import annotations

from functools import partial

from torch.utils.data import DataLoader

from clip_us import loop, metrics, viz
from clip_us.config import ClsConfig, parse_config
from clip_us.fileio import write_json
from clip_us.loop import gather_list, shard
from clip_us.losses import focal_loss
from clip_us.runs import fmt, start_run, summarize_seeds, supervised_data, supervised_step

CLS_METRICS = ("acc", "auc", "sensitivity", "specificity", "f1")
EXAMPLES = """examples:
  python train_cls.py --arch tiny --weights none --image-size 128 --phantom-n 120 --epochs 30 \\
      --eval-every 5 --seeds 1 --out-dir runs/demo-cls   # a few minutes on a CPU, no download
  python train_cls.py --dataset busi --data-root data/BUSI --adapter lora   # CLIP (LoRA)
  python train_cls.py --eval-only --checkpoint runs/demo-cls/seed1/best.pt \\
      --dataset folder --data-root data/LN-2             # an external test set
"""

# ----------------------------------------------------------------------------- setup
cfg = parse_config(ClsConfig, description=__doc__.split("\n\n")[0], epilog=EXAMPLES)
run = start_run(cfg, "train_cls")
cfg, device, adapter_cfg = run.cfg, run.device, run.adapter_config()
train_set, val_set, test_set, info = supervised_data(run, "cls")
# Focal loss: MONAI's FocalLoss(to_onehot_y=True), sigmoid (its default) or softmax.
focal = partial(focal_loss, use_softmax=cfg.focal == "softmax")
loss_step = supervised_step(focal, "label", device)


# ----------------------------------------------------------------------------- evaluation
def predict(model, dataset) -> list[dict]:
    """Class probabilities per image of this rank's shard, gathered over ranks."""
    model.eval()
    rows = []
    loader = DataLoader(shard(dataset, run.rank, run.world), batch_size=cfg.batch_size,
                        num_workers=cfg.workers)
    for batch in loader:
        with run.inference(model):  # --precision
            logits = model(batch["image"].to(device)).float()
        # Softmax over classes gives P(malignant), thresholded at 0.5, as the official code does.
        probs = logits.softmax(-1).cpu()
        rows += [{"path": p, "prob": float(q[1]), "pred": int(q.argmax()), "label": int(y)}
                 for p, q, y in zip(batch["path"], probs, batch["label"])]
    return gather_list(rows)


def score(rows) -> tuple[float, dict]:
    """(accuracy, report) of predicted rows."""
    probs = [r["prob"] for r in rows]
    if len({r["label"] for r in rows}) < 2:  # e.g. a tiny validation split: AUC is undefined
        print(f"note: only one class among {len(rows)} images; reporting accuracy alone")
        acc = metrics.accuracy([r["pred"] for r in rows], [r["label"] for r in rows])
        return acc, {"acc": acc, **{k: None for k in CLS_METRICS[1:]}}
    if not cfg.keep_normal:
        report = metrics.binary_report(probs, [r["label"] for r in rows], cfg.threshold)
        return report["acc"], report
    # With BUSI's normal class (2): accuracy over three classes; AUC, sensitivity, specificity
    # and F1 for malignant against the rest.
    report = metrics.binary_report(probs, [int(r["label"] == 1) for r in rows], cfg.threshold)
    report["acc"] = metrics.accuracy([r["pred"] for r in rows], [r["label"] for r in rows])
    return report["acc"], report


def evaluate(model, dataset) -> tuple[float, dict]:
    return score(predict(model, dataset))


# ----------------------------------------------------------------------------- run each seed
per_seed = []
for seed in cfg.seeds:  # --eval-only: the checkpoint's own seed, its weights loaded
    model = run.task_model(seed, "cls", adapter_cfg,
                           num_classes=3 if cfg.keep_normal else 2)
    loader = None if cfg.eval_only else \
        loop.train_loader(train_set, cfg.batch_size, cfg.workers, seed, run.rank, run.world)
    run.begin()  # all of the above was validation: the run folder is made at the first batch
    if loader is not None:
        loop.train(model, loader, loss_step, partial(evaluate, dataset=val_set),
                   **run.train_args(seed, adapter_cfg, "acc"))
    rows = predict(model, test_set)
    _, report = score(rows)
    run.log(seed=seed, test=report)
    per_seed.append(report)
    if run.main:
        write_json(run.out / f"predictions_seed{seed}.json", rows)
        if report["auc"] is not None:
            viz.save_roc_svg([r["prob"] for r in rows], [int(r["label"] == 1) for r in rows],
                             run.out / f"roc_seed{seed}.svg", f"{run.row} on {cfg.dataset}, seed {seed}")
        print(f"seed {seed} test: " + ", ".join(f"{k} {fmt(report[k])}" for k in CLS_METRICS))

# ----------------------------------------------------------------------------- results
if run.main:
    units = {k: "fraction" for k in CLS_METRICS}
    run.finish(run.results("cls", summarize_seeds(per_seed, CLS_METRICS), units, len(test_set),
                           info, n_dropped=0,
                           confusion_matrix=[r.get("confusion_matrix") for r in per_seed]),
               "focal loss", "acc")
