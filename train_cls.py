"""train_cls.py: one row of seed 003's Table 3, supervised group (benign vs malignant).

CLIP ViT-B/16's vision tower with LoRA or Mona (or neither), blocks 3/6/9 fused by the feature
reducer, then the official code's MLP head (`--cls-head mlp`) or the paper's pooling head
(`--cls-head pool`, §3.2). Focal loss as MONAI's FocalLoss(to_onehot_y=True), AdamW, cosine
schedule, best validation accuracy picks the checkpoint, seeds 1, 2, 3 averaged (§4.2).
Malignant (class 1) is the positive class for AUC, sensitivity and F1.

    python train_cls.py --dataset busi --data-root data/BUSI --adapter lora --adapter-train no
    python train_cls.py --eval-only --checkpoint runs/.../seed1/best.pt --data-root data/LN-2
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from functools import partial

import torch
from torch.utils.data import DataLoader

import clip_us
from clip_us import loop, metrics, tables, viz
from clip_us.adapters import AdapterConfig, format_count, load_task_state
from clip_us.config import SupervisedConfig, parse_config
from clip_us.distributed import gather_list, shard
from clip_us.fileio import write_json
from clip_us.losses import focal_loss
from clip_us.runs import fmt, save_loss_curves, start_run, summarize_seeds, supervised_data
from clip_us.taskmodel import make_task_model

CLS_METRICS = ("acc", "auc", "sensitivity", "specificity", "f1")


@dataclass
class Config(SupervisedConfig):
    cls_head: str = field(default="mlp", metadata={"choices": ["mlp", "pool"]})
    focal: str = field(default="sigmoid", metadata={"choices": ["sigmoid", "softmax"],
                                                    "help": "MONAI FocalLoss variant"})
    threshold: float = 0.5


# ----------------------------------------------------------------------------- setup
cfg = parse_config(Config, description=__doc__.splitlines()[0])
run = start_run(cfg, "train_cls")
cfg, device = run.cfg, run.device
train_set, val_set, test_set, _ = supervised_data(run, "cls")
adapter_cfg = AdapterConfig(kind=cfg.adapter)
settings = loop.Settings.of(cfg, metric="acc")


def loss_step(batch, model):
    """Focal loss (MONAI's FocalLoss(to_onehot_y=True), sigmoid or softmax) on one batch."""
    logits = model(batch["image"].to(device)).float()  # [B, classes]
    return focal_loss(logits, batch["label"].to(device), use_softmax=cfg.focal == "softmax")


# ----------------------------------------------------------------------------- evaluation
@torch.no_grad()
def predict(model, dataset) -> list[dict]:
    """Class probabilities per image of this rank's shard, gathered over ranks."""
    model.eval()
    rows = []
    loader = DataLoader(shard(dataset, run.rank, run.world), batch_size=cfg.batch_size,
                        num_workers=cfg.workers)
    for batch in loader:
        with loop.autocast(device, cfg.amp):
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
per_seed, cache = [], {}
for seed in cfg.seeds:  # --eval-only: the checkpoint's own seed
    model = make_task_model(cfg, "cls", adapter_cfg, cache, device, seed,
                            num_classes=3 if cfg.keep_normal else 2)
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
    results = {
        "script": "train_cls.py", "task": "cls", "dataset": cfg.dataset, "row": run.row,
        "backbone": cfg.backbone, "adapter": cfg.adapter, "init": cfg.init or None,
        "seeds": cfg.seeds, "metrics": summarize_seeds(per_seed, CLS_METRICS),
        "confusion_matrix": [r.get("confusion_matrix") for r in per_seed],
        "units": {k: "fraction" for k in CLS_METRICS}, "n_test": len(test_set), "n_dropped": 0,
        "config": asdict(cfg), "version": clip_us.__version__,
    }
    tables.write_results(run.out, results)
    save_loss_curves(run, "focal loss", "acc")
    print(f"results: {run.out / 'results.json'}")
    print(tables.row_csv(results))
