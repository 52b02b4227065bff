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

import dataclasses
import json
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, DistributedSampler

import clip_us
from clip_us import engine, metrics, tables, viz
from clip_us.adapters import AdapterConfig, format_count
from clip_us.backbone import make_task_model
from clip_us.data import DataConfig, build_datasets
from clip_us.losses import focal_loss

CLS_METRICS = ("acc", "auc", "sensitivity", "specificity", "f1")


@dataclass
class Config(engine.SupervisedConfig):
    task: str = "cls"
    cls_head: str = field(default="mlp", metadata={"choices": ["mlp", "pool"]})
    focal: str = field(default="sigmoid", metadata={"choices": ["sigmoid", "softmax"],
                                                    "help": "MONAI FocalLoss variant"})
    threshold: float = 0.5


# ----------------------------------------------------------------------------- setup
cfg = engine.parse_config(Config, description=__doc__.splitlines()[0])
rank, world, device = engine.setup_distributed(cfg.device)
main = rank == 0
if cfg.eval_only:
    ckpt = engine.load_checkpoint(cfg.checkpoint)
    cfg = engine.eval_only_config(cfg, Config, ckpt)
row = engine.row_name(cfg.backbone, cfg.adapter, bool(cfg.init))
out = Path(cfg.out_dir or engine.default_out_dir("train_cls", cfg.dataset, row))
adapter_cfg = AdapterConfig(kind=cfg.adapter)
if main:
    print(json.dumps(dataclasses.asdict(cfg), indent=2))
    out.mkdir(parents=True, exist_ok=True)
    engine.write_json(out / "config.json", dataclasses.asdict(cfg))
log = engine.JsonlLogger(out / "log.jsonl", enabled=main).log

data_cfg = DataConfig(dataset=cfg.dataset, root=cfg.data_root or None, task="cls",
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
loss_fn = partial(focal_loss, use_softmax=cfg.focal == "softmax")


# ----------------------------------------------------------------------------- evaluation
@torch.no_grad()
def predict(model, dataset) -> list[dict]:
    """Malignant probability per image of this rank's shard, gathered over ranks."""
    model.eval()
    rows = []
    loader = DataLoader(engine.shard(dataset, rank, world), batch_size=cfg.batch_size,
                        num_workers=cfg.workers)
    for batch in loader:
        with engine.autocast(device, cfg.amp):
            logits = model(batch["image"].to(device)).float()
        # Softmax over classes gives P(malignant), thresholded at 0.5, as the official code does.
        probs = logits.softmax(-1)
        rows += [{"path": p, "prob": float(q[1]), "pred": int(q.argmax()), "label": int(y)}
                 for p, q, y in zip(batch["path"], probs.cpu(), batch["label"])]
    return engine.gather_list(rows)


def evaluate(model, dataset) -> tuple[float, dict, list]:
    rows = predict(model, dataset)
    if not cfg.keep_normal:
        report = metrics.binary_report([r["prob"] for r in rows], [r["label"] for r in rows],
                                       threshold=cfg.threshold)
        return report["acc"], report, rows
    # With BUSI's normal class (2): accuracy over three classes; AUC, sensitivity, specificity
    # and F1 for malignant against the rest.
    report = metrics.binary_report([r["prob"] for r in rows], [int(r["label"] == 1) for r in rows],
                                   threshold=cfg.threshold)
    report["acc"] = metrics.accuracy([r["pred"] for r in rows], [r["label"] for r in rows])
    return report["acc"], report, rows


# ----------------------------------------------------------------------------- run each seed
per_seed, cache = [], {}
for seed in cfg.seeds:
    cfg.seed_now = seed
    model = make_task_model(cfg, "cls", adapter_cfg, cache, device, seed,
                            num_classes=3 if cfg.keep_normal else 2)
    if main:
        print(f"seed {seed}: {format_count(model)}")
    if cfg.eval_only:
        engine.restore_state(model, ckpt)
    else:
        sampler = DistributedSampler(train_set, world, rank, shuffle=True, seed=seed)
        loader = DataLoader(train_set, batch_size=cfg.batch_size, sampler=sampler,
                            num_workers=cfg.workers, drop_last=len(train_set) > cfg.batch_size)
        net = DDP(model) if world > 1 else model
        extra = {"config": dataclasses.asdict(cfg), "adapter_config": dataclasses.asdict(adapter_cfg),
                 "backbone_trained": False, "version": clip_us.__version__}
        engine.fit(net, loader, lambda m: evaluate(model, val_set)[:2], loss_fn, cfg,
                   out / f"seed{seed}", extra, log, device, main, target="label")
    _, report, rows = evaluate(model, test_set)
    log(seed=seed, test=report)
    per_seed.append(report)
    if main:
        engine.write_json(out / f"predictions_seed{seed}.json", rows)
        viz.save_roc_svg([r["prob"] for r in rows], [r["label"] for r in rows],
                         out / f"roc_seed{seed}.svg", f"{row} on {cfg.dataset}, seed {seed}")
        print(f"seed {seed} test: " + ", ".join(f"{k} {report[k]:.4f}" for k in CLS_METRICS))
    if cfg.eval_only:
        break

# ----------------------------------------------------------------------------- results
if main:
    results = {
        "script": "train_cls.py", "task": "cls", "dataset": cfg.dataset, "row": row,
        "backbone": cfg.backbone, "adapter": cfg.adapter, "init": cfg.init or None,
        "seeds": cfg.seeds[:len(per_seed)],
        "metrics": engine.summarize_seeds(per_seed, CLS_METRICS),
        "confusion_matrix": [r["confusion_matrix"] for r in per_seed],
        "units": {k: "fraction" for k in CLS_METRICS},
        "n_test": len(test_set), "n_dropped": 0,
        "config": dataclasses.asdict(cfg), "version": clip_us.__version__,
    }
    tables.write_results(out, results)
    history = engine.read_jsonl(out / "log.jsonl")
    curves = {f"seed {s} loss": [(r["epoch"], r["loss"]) for r in history
                                 if r.get("seed") == s and "loss" in r] for s in cfg.seeds}
    if any(curves.values()):
        viz.save_curves_svg(curves, out / "loss.svg", "training loss", "epoch", "focal loss")
    print(f"results: {out / 'results.json'}")
    print(tables.row_csv(results))
