"""Markdown tables of our results beside the papers': Tables 2 and 3 of Qu et al., "Adapting
Vision-Language Foundation Model for Next Generation Medical Ultrasound Image Analysis" (the
ultrasound-CLIP paper), and the held-out results of "Ultrasound Vision-Language Alignment via
Contrastive Learning" (EchoCare-CLIP).

    python -m clip_us.tables RUNS_DIR [--out FILE] [--all-datasets]

collects every `results.json` under RUNS_DIR (the schema the scripts write: task, dataset, row,
metrics, config, ...) and prints or writes the tables. The papers' numbers are embedded below,
transcribed from Tables 2 and 3 of the ultrasound-CLIP paper (mean of three runs, in percent)
and from EchoCare-CLIP.

Units. Our results store Dice, IoU, Acc and AUC as fractions in [0, 1]; the tables (and row.csv)
show them x100, in percent, like the paper. Our HD95, "ASD (directed)" and ASSD are pixels on each
run's own masks, whose size (the run's `image_size`) the "Masks px" column states. The paper labels
its HD95/ASD "%", yet some values exceed the 317 px diagonal of a 224x224 image, so its distance
columns are shown but are not directly comparable. The paper's "ASD" is MONAI's default, the
directed mean distance, so it sits beside our "ASD (directed)".

Eval-only results (`--eval-only`, config.eval_only) fill a row only where no trained run exists,
as for an external test set (LN-1's model on LN-2). One on the data its checkpoint was trained on
(results.json "trained_on" equals its dataset, or, when that is not recorded, a trained run of the
same row and dataset exists) gets its own row, "<row> (eval-only)", with a note: its test set
holds every image, training images included, so it never stands in for the trained row.

Also here, for the scripts: `row_csv` (one table row as CSV, in Table 2/3 column order) and
`write_results` (results.json + row.csv, written atomically). Nothing here imports a model.
"""
import csv
import io
import json
import math
import os
import sys
from dataclasses import dataclass

from .config import NOT_A_SETTING, opt, parse_config, report_errors, required
from .fileio import write_text
from .metrics import seed_summary

# ----------------------------------------------------------------------------- paper numbers

# Table 2, per dataset and row: (Dice, IoU, HD95, ASD), as printed (percent; distances "%").
PAPER_TABLE2 = {
    "ln1": {
        "UNet": (79.72, 71.67, 20.18, 7.35),
        "CLIP (LoRA)": (73.37, 62.84, 23.63, 8.12),
        "CLIP (LoRA, ft.)": (74.10, 63.55, 23.56, 8.29),
        "CLIPSeg": (78.21, 68.98, 21.21, 7.91),
        "BioMedCLIP": (72.62, 63.00, 28.81, 9.19),
        "UniMedCLIP": (74.59, 64.50, 30.13, 10.66),
        "MetaCLIP": (70.69, 59.36, 28.19, 10.24),
        "DINOv2": (63.02, 50.29, 111.22, 43.23),
        "CLIP (Mona)": (83.12, 75.41, 16.71, 5.70),
        "CLIP (Mona, ft.)": (70.97, 61.09, 25.76, 10.53),
    },
    "ln2": {
        "UNet": (75.68, 65.40, 33.34, 11.56),
        "CLIP (LoRA)": (73.96, 62.93, 27.24, 9.18),
        "CLIP (LoRA, ft.)": (73.50, 62.08, 28.73, 9.73),
        "CLIPSeg": (74.38, 64.30, 25.97, 8.76),
        "BioMedCLIP": (67.63, 55.95, 33.05, 11.25),
        "UniMedCLIP": (70.74, 58.99, 35.80, 12.13),
        "MetaCLIP": (69.45, 57.28, 35.58, 11.39),
        "DINOv2": (20.54, 12.61, 332.36, 208.71),
        "CLIP (Mona)": (78.91, 68.79, 23.58, 7.77),
        "CLIP (Mona, ft.)": (59.20, 47.98, 39.13, 15.27),
    },
    "busi": {
        "UNet": (82.19, 72.88, 23.83, 8.05),
        "CLIP (LoRA)": (78.86, 68.64, 19.46, 6.53),
        "CLIP (LoRA, ft.)": (78.55, 68.39, 20.56, 6.79),
        "CLIPSeg": (80.74, 71.32, 16.69, 5.77),
        "BioMedCLIP": (77.07, 65.92, 27.08, 8.79),
        "UniMedCLIP": (76.44, 65.61, 28.98, 9.74),
        "MetaCLIP": (75.63, 63.82, 33.64, 10.80),
        "DINOv2": (64.31, 52.05, 117.25, 48.80),
        "CLIP (Mona)": (80.78, 70.90, 19.07, 6.27),
        "CLIP (Mona, ft.)": (67.02, 55.37, 32.92, 12.59),
    },
    "ddti": {
        "UNet": (88.96, 80.58, 19.01, 6.74),
        "CLIP (LoRA)": (88.22, 79.34, 18.40, 7.16),
        "CLIP (LoRA, ft.)": (87.92, 78.86, 18.81, 7.18),
        "CLIPSeg": (89.18, 80.86, 17.29, 6.39),
        "BioMedCLIP": (88.17, 79.29, 19.59, 7.22),
        "UniMedCLIP": (88.84, 80.27, 17.76, 6.80),
        "MetaCLIP": (87.72, 78.51, 20.64, 7.75),
        "DINOv2": (85.98, 75.94, 52.54, 20.90),
        "CLIP (Mona)": (90.26, 82.61, 15.75, 5.91),
        "CLIP (Mona, ft.)": (85.76, 75.70, 19.91, 8.38),
    },
    "tn3k": {
        "UNet": (81.55, 72.83, 21.20, 6.92),
        "CLIP (LoRA)": (76.38, 65.61, 29.02, 9.38),
        "CLIP (LoRA, ft.)": (76.60, 65.86, 27.36, 8.83),
        "CLIPSeg": (77.91, 67.80, 21.58, 7.25),
        "BioMedCLIP": (73.40, 62.06, 32.43, 10.63),
        "UniMedCLIP": (72.68, 61.49, 33.63, 11.56),
        "MetaCLIP": (72.42, 60.76, 39.13, 13.17),
        "DINOv2": (60.76, 47.64, 119.25, 45.79),
        "CLIP (Mona)": (82.67, 73.58, 17.85, 5.68),
        "CLIP (Mona, ft.)": (69.25, 57.94, 28.46, 10.74),
    },
    "prostate": {
        "UNet": (92.73, 88.50, 12.45, 3.82),
        "CLIP (LoRA)": (90.43, 84.60, 18.10, 5.71),
        "CLIP (LoRA, ft.)": (90.69, 85.08, 17.44, 5.40),
        "CLIPSeg": (91.32, 86.26, 13.30, 4.27),
        "BioMedCLIP": (91.20, 85.30, 19.66, 6.01),
        "UniMedCLIP": (90.43, 84.61, 18.62, 5.93),
        "MetaCLIP": (90.25, 83.83, 30.12, 8.75),
        "DINOv2": (86.92, 79.10, 82.77, 27.28),
        "CLIP (Mona)": (92.58, 88.15, 11.17, 3.76),
        "CLIP (Mona, ft.)": (90.38, 84.62, 13.93, 4.81),
    },
}

# Table 3, per group and row: (LN-1 Acc, LN-1 AUC, LN-2 Acc, LN-2 AUC, BUSI Acc, BUSI AUC), percent.
PAPER_TABLE3_DATASETS = ("ln1", "ln2", "busi")
PAPER_TABLE3 = {
    "zeroshot": {
        "CLIP (vanilla)": (58.13, 52.30, 61.76, 64.69, 57.50, 50.73),
        "CLIP (LoRA)": (58.13, 52.30, 61.76, 64.69, 57.50, 50.73),
        "CLIP (LoRA, ft.)": (58.44, 52.40, 61.50, 64.66, 57.34, 50.67),
        "CLIP (Mona)": (58.13, 52.30, 61.76, 64.69, 57.50, 50.73),
        "CLIP (Mona, ft.)": (58.13, 52.30, 61.76, 64.69, 57.50, 50.73),
    },
    "cls": {
        "ResNet18": (85.30, 93.59, 73.26, 84.16, 88.24, 94.61),
        "CLIP (LoRA)": (82.68, 91.88, 67.38, 78.14, 83.34, 91.60),
        "CLIP (LoRA, ft.)": (85.04, 93.60, 70.86, 83.40, 86.98, 91.63),
        "BioMedCLIP": (85.57, 92.89, 70.86, 81.04, 83.86, 90.80),
        "UniMedCLIP": (83.99, 91.29, 72.10, 84.54, 82.81, 95.63),
        "MetaCLIP": (88.19, 93.59, 66.84, 81.13, 84.38, 88.23),
        "DINOv2": (79.53, 84.34, 49.20, 62.92, 37.50, 65.62),
        "CLIP (Mona)": (82.68, 92.03, 69.79, 80.34, 83.33, 87.57),
        "CLIP (Mona, ft.)": (80.31, 85.87, 73.80, 85.04, 77.60, 82.64),
    },
}

DATASETS = {"ln1": "LN-1", "ln2": "LN-2", "busi": "BUSI", "ddti": "DDTI", "tn3k": "TN3K",
            "prostate": "Prostate", "phantom": "Phantom"}
ROWS = ["CLIP (vanilla)", "CLIP (LoRA)", "CLIP (LoRA, ft.)", "CLIP (Mona)", "CLIP (Mona, ft.)",
        "UNet", "ResNet18", "CLIPSeg", "BioMedCLIP", "UniMedCLIP", "MetaCLIP", "DINOv2"]

# ----------------------------------------------------------------------------- CSV row

ROW_CSV_COLUMNS = {"seg": ["dice", "iou", "hd95", "asd_directed", "assd"],
                   "cls": ["acc", "auc"], "zeroshot": ["acc", "auc"],
                   # evaluate.py (EchoCare-CLIP's protocol): fractions and cosines as stored
                   "align": ["paired", "cross", "gap", "strict_i2t_R@1", "dup_i2t_R@1", "zs_acc",
                             "zs_f1", "zs_auroc", "probe_acc", "probe_f1", "probe_auroc"]}
COLUMN_NAMES = {"dice": "Dice", "iou": "IoU", "hd95": "HD95", "asd_directed": "ASD (directed)",
                "assd": "ASSD", "acc": "Acc", "auc": "AUC", "paired": "paired", "cross": "cross",
                "gap": "gap", "strict_i2t_R@1": "I2T R@1 (strict)",
                "dup_i2t_R@1": "I2T R@1 (duplicate-aware)", "zs_acc": "zero-shot acc",
                "zs_f1": "zero-shot F1", "zs_auroc": "zero-shot AUROC", "probe_acc": "probe acc",
                "probe_f1": "probe F1", "probe_auroc": "probe AUROC"}
# evaluate.py on a manifest without labels has no classification metrics: written as nan
OPTIONAL = {"align": ("zs_acc", "zs_f1", "zs_auroc", "probe_acc", "probe_f1", "probe_auroc")}
PERCENT = {"dice", "iou", "acc", "auc"}  # stored as fractions, shown x100
MISSING = "—"
PENDING = "…"  # a run python -m clip_us.reproduce planned that has no results.json yet


def _display(key, value):
    """A stored metric value in table units: percent for fractions, pixels for distances."""
    if value is None or not math.isfinite(value):
        return float("nan")
    return value * 100.0 if key in PERCENT else float(value)


def row_csv(results: dict) -> str:
    """One table row as CSV: header `dataset,row,<Table 2 or 3 columns>` and one line of means.

    Dice/IoU/Acc/AUC are in percent (x100 of the stored fractions) and distances in pixels, so
    the line reads like a row of the paper's table. A non-finite mean is written as `nan`.
    """
    task = results.get("task")
    if task not in ROW_CSV_COLUMNS:
        raise ValueError(f"row_csv: task {task!r} has no table row; expected one of "
                         f"{sorted(ROW_CSV_COLUMNS)}")
    keys = ROW_CSV_COLUMNS[task]
    missing = [k for k in keys if k not in results.get("metrics", {}) and k not in OPTIONAL.get(task, ())]
    if missing:
        raise ValueError(f"row_csv: results for {results.get('row')!r} lack metrics {missing}")
    values = [f"{_display(k, results['metrics'].get(k, {}).get('mean')):.4f}" for k in keys]
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")  # quotes row names such as "CLIP (Mona, ft.)"
    writer.writerow(["dataset", "row"] + [COLUMN_NAMES[k] for k in keys])
    writer.writerow([results.get("dataset", ""), results.get("row", "")] + values)
    return buf.getvalue()


def _json_default(obj):
    """numpy/torch scalars and arrays, and paths, in results dicts -> plain JSON values."""
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    raise TypeError(f"write_results: cannot store {type(obj).__name__} in results.json")


def write_results(out_dir, results: dict):
    """Write OUT_DIR/results.json and, for a task with a table row (seg, cls, zeroshot, align),
    OUT_DIR/row.csv, each atomically.

    Returns the list of paths written.
    """
    text = json.dumps(results, indent=2, default=_json_default) + "\n"
    paths = [os.path.join(out_dir, "results.json")]
    csv_text = row_csv(results) if results.get("task") in ROW_CSV_COLUMNS else None
    write_text(paths[0], text)
    if csv_text is not None:
        paths.append(os.path.join(out_dir, "row.csv"))
        write_text(paths[1], csv_text)
    return paths


# ----------------------------------------------------------------------------- collecting results

REQUIRED = ("task", "dataset", "row", "metrics")
TASKS = ("seg", "cls", "zeroshot", "align", "contrastive")  # contrastive: listed under Sources only
EVAL_ONLY = " (eval-only)"  # suffix of the row an eval-only result gets of its own


def canonical(name, known):
    """Match a dataset key or row name to a known one, ignoring case, spaces, '-' and '_'."""
    squash = lambda s: "".join(ch for ch in str(s).lower() if ch not in " -_")  # noqa: E731
    return next((k for k in known if squash(k) == squash(name)), str(name))


def load_result(path):
    """Read and check one results.json; raises ValueError naming the file when it is unusable."""
    try:
        with open(path, encoding="utf-8") as f:
            res = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e}); delete or rewrite this results.json") from e
    missing = [k for k in REQUIRED if k not in res] if isinstance(res, dict) else list(REQUIRED)
    if missing:
        raise ValueError(f"{path}: results.json lacks {missing}; it was not written by a "
                         "clip_us script (train_seg.py, train_cls.py, zeroshot.py, "
                         "train_contrastive.py, evaluate.py): move it out of the folder")
    if res["task"] not in TASKS:
        raise ValueError(f"{path}: unknown task {res['task']!r}; expected one of {TASKS}")
    _check_fractions(path, res)
    res["dataset"] = canonical(res["dataset"], DATASETS)
    res["row"] = canonical(res["row"], ROWS)
    return res


def _check_fractions(path, res):
    """Catch results already in percent: they would be shown x100 again."""
    for key in PERCENT & set(res["metrics"]):
        mean = res["metrics"][key].get("mean")
        if mean is not None and math.isfinite(mean) and not -1e-9 <= mean <= 1 + 1e-9:
            raise ValueError(f"{path}: metric {key!r} has mean {mean}, but results.json stores "
                             "fractions in [0, 1]; divide it by 100")


def _key(res):
    return res["task"], res["dataset"], res["row"]


def _eval_only(res):
    return bool(res.get("eval_only", (res.get("config") or {}).get("eval_only", False)))


# config keys in which the runs of one row's seeds differ (python -m clip_us.reproduce runs each
# seed in its own folder; an --eval-only result's checkpoint is its seed's)
SEED_FREE = (*NOT_A_SETTING, "seeds", "checkpoint")


def _config_but_seed(res) -> dict:
    return {k: v for k, v in (res.get("config") or {}).items() if k not in SEED_FREE}


def _joinable(group) -> bool:
    """Several runs of one row that differ only in their seeds, each metric kept per seed."""
    seeds = [s for r in group for s in r.get("seeds") or []]
    if not all(r.get("seeds") for r in group):  # zero-shot has none: nothing to join
        return False
    same = all(_config_but_seed(r) == _config_but_seed(group[0]) for r in group)
    per_seed = all("per_seed" in m for r in group for m in r["metrics"].values())
    keys = {frozenset(r["metrics"]) for r in group}
    return len(group) > 1 and len(set(seeds)) == len(seeds) and same and per_seed and len(keys) == 1


def _join_dropped(group):
    """n_dropped of joined runs: {metric: [count per seed]} lists concatenated."""
    dropped = [r.get("n_dropped") for r in group]
    if not all(isinstance(d, dict) for d in dropped):
        return group[0].get("n_dropped")
    return {k: [c for d in dropped for c in (d.get(k) if isinstance(d.get(k), list) else [d.get(k)])]
            for k in dropped[0]}


def _join_seeds(group):
    """One result from the per-seed runs of one row: each metric's per-seed values in seed
    order, mean and std over all of them (metrics.seed_summary, as one run of several seeds
    reports them)."""
    group = sorted(group, key=lambda r: min(r["seeds"]))
    joined = dict(group[0])
    joined["metrics"] = {k: seed_summary([v for r in group for v in r["metrics"][k]["per_seed"]])
                         for k in group[0]["metrics"]}
    joined.update(seeds=[s for r in group for s in r["seeds"]], n_dropped=_join_dropped(group),
                  _path=", ".join(r["_path"] for r in group),
                  _mtime=max(r["_mtime"] for r in group))
    return joined


def _newest(found):
    """{key: result} from {key: [results]}: the runs of one row's seeds joined, else the newest,
    with a note per key that had several."""
    chosen, notes = {}, []
    for key, group in found.items():
        if _joinable(group):
            chosen[key] = _join_seeds(group)
            continue
        group.sort(key=lambda r: r["_mtime"], reverse=True)
        chosen[key] = group[0]
        if len(group) > 1:
            older = ", ".join(f"`{r['_path']}`" for r in group[1:])
            notes.append((key, f"{len(group)} results for {DATASETS.get(key[1], key[1])} / {key[2]} "
                               f"({key[0]}): used the newest, `{group[0]['_path']}`; ignored {older}."))
    return chosen, notes


def _place_eval_only(res, trained):
    """Move an eval-only result to its own "(eval-only)" row when it is on its training data, or
    when a trained run holds its row; returns the note to show beside it."""
    ds = DATASETS.get(res["dataset"], res["dataset"])
    known = res.get("trained_on")
    on_own_data = canonical(known, DATASETS) == res["dataset"] if known else _key(res) in trained
    if not on_own_data and _key(res) not in trained:
        origin = f"trained on {DATASETS.get(canonical(known, DATASETS), known)}" if known else \
            "its training data not recorded"
        return f"`{res['_path']}`: an --eval-only result on every image of {ds} ({origin})."
    why = (f"on {ds}, the data its checkpoint was trained on, so its test set holds the training "
           "images too" if known and on_own_data else
           f"on {ds}, where a trained run of this row exists" +
           ("" if known else " (results.json does not say what its checkpoint was trained on)"))
    res["row"] += EVAL_ONLY
    return (f"`{res['_path']}`: an --eval-only result {why}; shown as its own row, not in "
            "place of the trained one.")


def collect(runs_dir):
    """{(task, dataset, row): result} from every results.json under runs_dir, plus notes.

    When two files share (task, dataset, row), the newest by modification time wins and a note
    names both. An eval-only result never replaces a trained run (see the module docstring).
    """
    paths = sorted(os.path.join(d, "results.json") for d, _, files in os.walk(runs_dir)
                   if "results.json" in files)
    if not paths:
        raise FileNotFoundError(f"no results.json under {runs_dir}; pass the folder that holds "
                                "the runs (e.g. runs/)")
    results = []
    for p in paths:
        res = load_result(p)
        res["_path"], res["_mtime"] = os.path.relpath(p, runs_dir), os.path.getmtime(p)
        results.append(res)
    trained = {_key(r) for r in results if not _eval_only(r)}
    eval_notes = [(r, _place_eval_only(r, trained)) for r in results if _eval_only(r)]
    found = {}
    for res in results:
        found.setdefault(_key(res), []).append(res)
    chosen, notes = _newest(found)
    # Eval-only notes only for the results shown, so a superseded one does not leave a stray note.
    shown = {id(r) for r in chosen.values()}
    notes = [(_key(r), text) for r, text in eval_notes if id(r) in shown] + notes
    return chosen, notes + [(k, _dinov2_note(r)) for k, r in chosen.items() if _dinov2_note(r)]


def _dinov2_note(res) -> str:
    """Which DINOv2 a row used: the paper's rows come from a model without layer-scale."""
    cfg = res.get("config") or {}
    if cfg.get("backbone") != "dinov2":
        return ""
    if cfg.get("dinov2_official"):
        built = ("--dinov2-official: built without layer-scale, every ls1/ls2 gamma of the "
                 "checkpoint ignored, as the official code's strict=False load did (the paper's rows)")
    else:
        built = "DINOv2 with its layer-scale, as published (the paper's rows ran without it)"
    head = cfg.get("head", "official")
    return f"{built}; {head} head at {cfg.get('image_size', '?')} px."


# ----------------------------------------------------------------------------- rendering

def _fmt_ours(res, key):
    """'mean ± std' over seeds (just the mean for one seed), in table units; '—' when absent."""
    if (res or {}).get("_pending"):
        return PENDING
    m = (res or {}).get("metrics", {}).get(key)
    if m is None:
        return MISSING
    mean = _display(key, m.get("mean"))
    if not math.isfinite(mean):
        return "n/a"  # every test image was dropped for this metric
    per_seed = m.get("per_seed") or []
    if len(per_seed) > 1 and m.get("std") is not None:
        return f"{mean:.2f} ± {_display(key, m['std']):.2f}"
    return f"{mean:.2f}"


def _fmt_paper(value):
    return MISSING if value is None else f"{value:.2f}"


def _fmt_size(res):
    """The run's square input and mask side, from its config: distances are pixels at this size."""
    if (res or {}).get("_pending"):
        return PENDING
    size = ((res or {}).get("config") or {}).get("image_size")
    return MISSING if size is None else f"{size}×{size}"


def _fmt_count(res):
    """Seeds and test-set size (with the largest number of images dropped from any metric)."""
    if res is None or res.get("_pending"):
        return [PENDING if res else MISSING] * 2
    dropped = res.get("n_dropped") or 0
    # {metric: count} or, as the scripts write it, {metric: [count per seed]}
    counts = dropped.values() if isinstance(dropped, dict) else [dropped]
    dropped = max((max(c, default=0) if isinstance(c, list) else c for c in counts), default=0)
    n = f"{res.get('n_test', MISSING)}" + (f" ({dropped} dropped)" if dropped else "")
    return [str(len(res.get("seeds") or [])), n]


def _row_order(paper_rows, our_rows):
    """The paper's rows in its order, then ours that it lacks (known names first); an eval-only
    row right after the row it was kept apart from."""
    known = list(paper_rows) + [r for r in ROWS if r not in paper_rows]
    extra = {r.removesuffix(EVAL_ONLY) for r in our_rows} - set(paper_rows)
    extra = sorted(extra, key=lambda r: (known.index(r) if r in known else len(known), r))
    out = []
    for base in list(paper_rows) + extra:
        out += [r for r in (base, base + EVAL_ONLY) if r in our_rows or r in paper_rows]
    return out


def _dataset_order(keys):
    return sorted(set(keys), key=lambda d: (list(DATASETS).index(d) if d in DATASETS else 99, d))


def _md_table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return lines + ["| " + " | ".join(r) + " |" for r in rows]


def _method(name, key, marks):
    return name + (f" [^{marks[key]}]" if key in marks else "")


SEG_HEADER = ["Method", "Dice", "Dice (paper)", "IoU", "IoU (paper)", "HD95 px", "HD95 (paper)†",
              "ASD (directed) px", "ASD (paper)†", "ASSD px", "Seeds", "n test", "Masks px"]


def _seg_rows(dataset, chosen, marks):
    paper = PAPER_TABLE2.get(dataset, {})
    ours = {row: r for (task, ds, row), r in chosen.items() if task == "seg" and ds == dataset}
    out = []
    for row in _row_order(paper, ours):
        p, res = paper.get(row, (None,) * 4), ours.get(row)
        f = lambda k: _fmt_ours(res, k)  # noqa: E731
        out.append([_method(row, ("seg", dataset, row), marks), f("dice"), _fmt_paper(p[0]),
                    f("iou"), _fmt_paper(p[1]), f("hd95"), _fmt_paper(p[2]), f("asd_directed"),
                    _fmt_paper(p[3]), f("assd")] + _fmt_count(res) + [_fmt_size(res)])
    return out


def render_table2(chosen, marks, all_datasets=False):
    datasets = [ds for task, ds, _ in chosen if task == "seg"]
    datasets = _dataset_order(datasets + (list(PAPER_TABLE2) if all_datasets else []))
    lines = ["## Table 2: segmentation", "",
             "Ours: mean ± std over seeds; the paper: mean of three runs. Dice and IoU in percent "
             "(our results.json stores fractions in [0, 1]; shown ×100). Our HD95, ASD (directed) "
             "and ASSD are in pixels on each run's own masks, of the size in its Masks px column "
             "(its input size): distances at different sizes are not comparable.", "",
             "† The paper's HD95 and ASD are labelled \"%\" there, yet some exceed the 317 px "
             "diagonal of a 224×224 image (DINOv2, LN-2: HD95 332.36), so their unit is unclear: "
             "they are **not directly comparable** with our pixel distances. The paper's ASD "
             "matches the official code's MONAI default, the directed mean distance from "
             "prediction to ground truth; it has no ASSD column. — means no number."]
    for ds in datasets:
        table = _md_table(SEG_HEADER, _seg_rows(ds, chosen, marks))
        lines += ["", f"### {DATASETS.get(ds, ds)}", ""] + table
    return lines if datasets else lines + ["", "_No segmentation results found._"]


CLS_HEADER = ["Group", "Method", "Acc", "Acc (paper)", "AUC", "AUC (paper)", "Seeds", "n test",
              "Input px"]
GROUPS = (("zeroshot", "Zero-shot"), ("cls", "Supervised"))


def _cls_rows(dataset, chosen, marks):
    col = PAPER_TABLE3_DATASETS.index(dataset) if dataset in PAPER_TABLE3_DATASETS else None
    out = []
    for task, group in GROUPS:
        paper = PAPER_TABLE3[task] if col is not None else {}
        ours = {row: r for (t, ds, row), r in chosen.items() if t == task and ds == dataset}
        for row in _row_order(paper, ours):
            p = paper[row][2 * col:2 * col + 2] if row in paper else (None, None)
            res = ours.get(row)
            out.append([group, _method(row, (task, dataset, row), marks), _fmt_ours(res, "acc"),
                        _fmt_paper(p[0]), _fmt_ours(res, "auc"), _fmt_paper(p[1])]
                       + _fmt_count(res) + [_fmt_size(res)])
    return out


def render_table3(chosen, marks, all_datasets=False):
    datasets = [ds for task, ds, _ in chosen if task in ("cls", "zeroshot")]
    datasets = _dataset_order(datasets + (list(PAPER_TABLE3_DATASETS) if all_datasets else []))
    lines = ["## Table 3: classification", "",
             "Ours: mean ± std over seeds; the paper: mean of three runs. Acc and AUC in percent "
             "(our results.json stores fractions in [0, 1]; shown ×100). Malignant is the positive "
             "class. Zero-shot rows come from zeroshot.py, supervised rows from train_cls.py."]
    for ds in datasets:
        table = _md_table(CLS_HEADER, _cls_rows(ds, chosen, marks))
        lines += ["", f"### {DATASETS.get(ds, ds)}", ""] + table
    if not datasets:
        lines += ["", "_No classification results found._"]
    return lines + ["", "Note: the paper's zero-shot CLIP (Mona) and CLIP (Mona, ft.) rows equal "
                    "CLIP (vanilla) exactly, on every dataset. An applied Mona cannot give that (its "
                    "up-projection is not zero-initialised, so it changes the features): the official "
                    "evaluation evidently ran without the adapter. We apply the adapters we are given, "
                    "so our zero-shot Mona rows are expected to differ from "
                    "vanilla CLIP."]


SECTIONS = ("table2", "table3", "echocare")


def render(chosen, notes=(), all_datasets=False, sections=SECTIONS):
    """The whole Markdown document: Tables 2 and 3, the EchoCare-CLIP table when there are
    evaluate.py results, duplicate notes and the source files; `sections` picks the tables."""
    merged = {}
    for key, text in notes:  # one footnote per row, however many notes it has
        merged.setdefault(key, []).append(text)
    marks = {key: f"d{i + 1}" for i, key in enumerate(merged)}
    title = ("# clip_us results beside EchoCare-CLIP's" if sections == ("echocare",) else
             "# clip_us results beside Tables 2 and 3 of Qu et al., \"Adapting Vision-Language "
             "Foundation Model for Next Generation Medical Ultrasound Image Analysis\"")
    lines = [title, ""]
    lines += render_table2(chosen, marks, all_datasets) + [""] if "table2" in sections else []
    lines += render_table3(chosen, marks, all_datasets) + [""] if "table3" in sections else []
    if "echocare" in sections and any(t == "align" for t, _, _ in chosen):
        lines += render_echocare(chosen) + [""]
    if any(r.get("_pending") for r in chosen.values()):
        lines += [f"{PENDING} marks a run that `python -m clip_us.reproduce` planned and that has "
                  "no results.json yet: not run, failed, or still running.", ""]
    lines += [f"[^{marks[key]}]: {' '.join(texts)}" for key, texts in merged.items()]
    lines += [""] if notes else []
    return "\n".join(lines + _sources(chosen)) + "\n"


SWEEP_TASKS = {"table2": ("seg",), "table3": ("cls", "zeroshot"), "echocare": ("align",)}


def render_sweep(runs_dir, table: str, jobs) -> str:
    """The table a sweep (python -m clip_us.reproduce) renders: the results under runs_dir
    beside the paper's, and PENDING in each cell a planned run fills that has no results.json
    yet. `jobs`: the plan's jobs; each names its cells, (task, dataset, row)."""
    try:
        chosen, notes = collect(runs_dir)
    except FileNotFoundError:  # nothing finished yet
        chosen, notes = {}, []
    tasks = SWEEP_TASKS[table]
    chosen = {k: r for k, r in chosen.items() if k[0] in tasks}
    for key in (k for job in jobs for k in job.cells if k[0] in tasks):
        chosen.setdefault(key, {"_pending": True, "metrics": {},
                                "_path": "planned, no results.json yet"})
    return render(chosen, [(k, t) for k, t in notes if k in chosen], sections=(table,))


def _sources(chosen):
    note = {"contrastive": ", train_contrastive.py: not a table row"}
    return ["## Sources", ""] + [
        f"- {DATASETS.get(ds, ds)} / {row} ({task}{note.get(task, '')}): `{r.get('_path', '?')}`"
        for (task, ds, row), r in sorted(chosen.items())]


# ----------------------------------------------------------------------------- EchoCare-CLIP

# The authors' held-out BUSI results (117 test images, 3 classes): (paired, cross, zero-shot acc,
# linear probe acc, linear probe AUROC), as published.
PAPER_ECHOCARE = {
    "OpenAI CLIP (ViT-B/32)": (0.329, 0.328, 0.444, 0.855, 0.943),
    "BiomedCLIP": (0.419, 0.416, 0.325, 0.829, 0.952),
    "CLIP text tower + heads fine-tuned, template captions": (0.688, 0.642, 0.709, 0.761, 0.907),
}
ECHOCARE_HEADER = ["Model", "source", "paired", "cross", "gap", "zero-shot acc", "probe acc",
                   "probe AUROC", "n test"]
ECHOCARE_KEYS = ("paired", "cross", "gap", "zs_acc", "probe_acc", "probe_auroc")


def _fmt_ci(res, key):
    """'mean [low, high]' with the bootstrap CI when there is one, 3 decimals, as the paper."""
    if res.get("_pending"):
        return PENDING
    m = res["metrics"].get(key)
    if m is None or m.get("mean") is None:
        return MISSING
    ci = (res.get("ci") or {}).get(key)
    return f"{m['mean']:.3f}" + (f" [{ci['low']:.3f}, {ci['high']:.3f}]" if ci else "")


def render_echocare(chosen):
    """EchoCare-CLIP's table: the authors' published rows, then ours (task align), per data set."""
    lines = ["## EchoCare-CLIP evaluation: \"Ultrasound Vision-Language Alignment via "
             "Contrastive Learning\"", "",
             "Paper rows: the authors' held-out BUSI results (117 test images, 3 classes). The "
             "abstract's paired 0.682 is BERT with full fine-tuning on the in-distribution test "
             "split, where its cross score is 0.014; the AULI zero-shot 0.626 is the CLIP text "
             "tower with the image encoder fine-tuned, scored on all 735 liver images, not a test "
             "split (evaluate.py --split all). Ours: evaluate.py, values as stored "
             "(fractions and cosines), with 95 % bootstrap CIs over test images in brackets.", ""]
    rows = [[name, "paper", f"{p[0]:.3f}", f"{p[1]:.3f}", f"{p[0] - p[1]:.3f}", f"{p[2]:.3f}",
             f"{p[3]:.3f}", f"{p[4]:.3f}", "117"] for name, p in PAPER_ECHOCARE.items()]
    for (task, ds, row), res in sorted(chosen.items()):
        if task == "align":
            # the paper's rows are 3-class: say so when ours were not (--classes)
            n_cls = len(res.get("classes") or [])
            where = DATASETS.get(ds, ds) + (f", {n_cls} classes" if n_cls and n_cls != 3 else "")
            rows.append([row, f"ours ({where})"] +
                        [_fmt_ci(res, k) for k in ECHOCARE_KEYS] + [str(res.get("n_test", MISSING))])
    return lines + _md_table(ECHOCARE_HEADER, rows)


@dataclass(kw_only=True)
class TablesCommand:
    """The command line: which runs, and where the tables go."""
    runs_dir: str = required("folder searched recursively for results.json files", positional=True)
    out: str | None = opt(None, "Markdown file to write, atomically (default: print to stdout)")
    all_datasets: bool = opt(False, "also show the paper's datasets for which we have no results")
    debug: bool = opt(False, "show the traceback of an error")


def main(argv=None):
    args = parse_config(TablesCommand, argv, description=__doc__.split("\n\n")[0],
                        prog="python -m clip_us.tables")
    report_errors(args.debug)  # a bad results.json: one line, exit status 2
    if not os.path.isdir(args.runs_dir):
        raise NotADirectoryError(f"{args.runs_dir} is not a folder; pass the folder that holds "
                                 "the runs (e.g. runs/)")
    chosen, notes = collect(args.runs_dir)
    text = render(chosen, notes, args.all_datasets)
    if args.out:
        write_text(args.out, text)
        print(f"wrote {args.out}")
    else:
        sys.stdout.write(text)


if __name__ == "__main__":
    main()
