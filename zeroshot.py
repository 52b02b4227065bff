"""zeroshot.py: one row of Table 3, zero-shot group, of Qu et al., "Adapting Vision-Language
Foundation Model for Next Generation Medical Ultrasound Image Analysis" (the ultrasound-CLIP
paper), or with the prompt of "Ultrasound Vision-Language Alignment via Contrastive Learning"
(EchoCare-CLIP).

Per class, a set of prompts is encoded and L2-normalised; an image's logit for a class is
100·cos(image, prompt) averaged over that class's prompts; softmax, then P(malignant) > 0.5
(the official code's zero-shot evaluation, which scores every image of the data set: `--split
all`). Prompts: `paper` (§4.3 of the ultrasound-CLIP paper: LN and BUSI), `echocare` ("An
ultrasound image of {organ} with {label} findings.", EchoCare-CLIP's), `ensemble` (ten
paraphrases per class) or a JSON file {class: [prompts]}.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from tqdm import tqdm

from clip_us import metrics, tables, viz
from clip_us.adapters import AdapterConfig
from clip_us.config import ZeroShotConfig, parse_config, report_errors
from clip_us.data import build_datasets
from clip_us.evaluation import prompts
from clip_us.evaluation.protocol import class_logits
from clip_us.fileio import write_json
from clip_us.loop import setup_distributed
from clip_us.precision import inference, resolve_precision
from clip_us.runs import (
    RunFolder,
    data_config,
    dataset_name,
    default_out_dir,
    init_checkpoint,
    make_results,
    row_name,
    summarize_seeds,
)
from clip_us.taskmodel import adapt
from clip_us.tokenizer import tokenize
from clip_us.weights import build_clip

ZS_METRICS = ("acc", "auc", "sensitivity", "specificity", "f1")
EXAMPLES = """examples:
  python zeroshot.py --arch tiny --weights none --phantom-n 40   # seconds, random weights
  python zeroshot.py --dataset busi --data-root data/BUSI        # Table 3, CLIP (vanilla)
  python zeroshot.py --dataset busi --data-root data/BUSI --adapter mona --init runs/ft/mona/best.pt
"""

cfg = parse_config(ZeroShotConfig, description=__doc__.split("\n\n")[0], epilog=EXAMPLES)
report_errors(cfg.debug)
cfg, init_from = init_checkpoint(cfg)  # --init checked; its adapter, unless --adapter was given
_, _, device = setup_distributed(cfg.device)
row = row_name("clip", cfg.adapter, bool(init_from), init_by=(init_from or {}).get("script", ""))
out = Path(cfg.out_dir or default_out_dir("zeroshot", cfg.dataset, row))
folder = RunFolder(out, given=bool(cfg.out_dir))  # written once, when the scoring starts
folder.check()
print(f"zeroshot.py: {row} on {cfg.dataset} ({cfg.split} images), {device}; output {out} "
      f"(config.json has every setting)")

# ----------------------------------------------------------------------------- model and prompts
adapter_cfg = AdapterConfig(kind=cfg.adapter, mona_variant=cfg.mona_variant)
model = adapt(build_clip(cfg.weights, cfg.arch), adapter_cfg, cfg.init or None,
              cfg.clip_norm).eval()
model = model.to(device)
precision = resolve_precision(cfg.precision, device)  # bf16 -> fp32 on CPUs without native bf16
# Which data set's prompts: LN data usually come through the nextgen or folder layouts, so the
# release's <DS> name (e.g. LN-1) decides when given. The phantom stands in for BUSI.
prompt_key = (cfg.prompt_set or cfg.nextgen_name or cfg.dataset).lower().replace("-", "")
prompt_key = "busi" if prompt_key == "phantom" else prompt_key
source = cfg.prompts
if source == "auto":
    source = "official" if prompt_key == "busi" or prompt_key.startswith("ln") else "echocare"
class_prompts = prompts.get_prompts(source, prompt_key, organ=cfg.organ or None)
print("prompts:", json.dumps(class_prompts, indent=2))


def encode_prompts(class_prompts: dict) -> torch.Tensor:
    """[classes, prompts, D] L2-normalised text embeddings (prompt counts may differ: padded
    classes would distort the mean, so every class must have the same number)."""
    counts = {len(v) for v in class_prompts.values()}
    if len(counts) != 1:
        raise ValueError(f"every class needs the same number of prompts, got {counts}")
    texts = [t for c in class_prompts for t in class_prompts[c]]
    with inference(model, precision, device):
        emb = F.normalize(model.encode_text(tokenize(texts).to(device)).float(), dim=-1)
    return emb.view(len(class_prompts), counts.pop(), -1)  # [C * P, D] -> [C, P, D]


text = encode_prompts(class_prompts)

# ----------------------------------------------------------------------------- images
# --split all (the official evaluation) scores every image, so no split is needed or saved.
every = cfg.split == "all"
data_cfg = data_config(cfg, "cls", None if every else str(out / "split.json"),
                       require_split=not every, train_aug=False)
train_set, val_set, test_set, info = build_datasets(data_cfg)
folder.split = info.pop("new_split")
dataset = torch.utils.data.ConcatDataset([train_set, val_set, test_set]) if every else test_set
print(f"data: {len(dataset)} images scored ({cfg.split})")
folder.begin(cfg)  # all of the above was validation: the run folder is made now
rows = []
with inference(model, precision, device):  # folded QuickGELU, --precision (clip_us/precision.py)
    for batch in tqdm(DataLoader(dataset, cfg.batch_size, num_workers=cfg.workers), "zero-shot"):
        img = F.normalize(model.encode_image(batch["image"].to(device)).float(), dim=-1)
        logits = class_logits(img, text, 100)  # [B, C]: 100·cos averaged over prompts, as evaluate.py
        probs = logits.softmax(-1)[:, 1].cpu().tolist()
        rows += [{"path": p, "prob": q, "label": int(y)}
                 for p, q, y in zip(batch["path"], probs, batch["label"])]

# ----------------------------------------------------------------------------- results
report = metrics.binary_report([r["prob"] for r in rows], [r["label"] for r in rows],
                               threshold=cfg.threshold)
print(f"{row} zero-shot on {cfg.dataset} ({len(rows)} images, prompts: {source}): "
      f"Acc {report['acc']:.4f}  AUC {report['auc']:.4f}")
print(f"confusion matrix [[TN, FP], [FN, TP]]: {report['confusion_matrix']}")
results = make_results(
    script="zeroshot.py", task="zeroshot", dataset=dataset_name(cfg.dataset, cfg.nextgen_name), row=row, backbone="clip",
    adapter=cfg.adapter, init=cfg.init or None, init_from=init_from, seeds=[],
    metrics=summarize_seeds([report], ZS_METRICS), units={k: "fraction" for k in ZS_METRICS},
    n_test=len(rows), n_dropped=0, precision=precision, data=info.get("health", {}), config=cfg,
    random_weights=cfg.weights == "none",
    confusion_matrix=report["confusion_matrix"], prompts=class_prompts)
write_json(out / "predictions.json", rows)
tables.write_results(out, results)
viz.save_roc_svg([r["prob"] for r in rows], [r["label"] for r in rows], out / "roc.svg",
                 f"{row} zero-shot on {cfg.dataset}")
print(f"results: {out / 'results.json'}")
