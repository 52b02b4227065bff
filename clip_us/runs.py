"""One run of a script: its output folder, JSONL log, row name, data and the seeds' summary.

Every script writes one folder (`--out-dir`, default `runs/<script>/<dataset>-<row>-<time>`):
`config.json` (the resolved config), `log.jsonl` (one JSON object per epoch, validation and test),
`results.json` + `row.csv` (tables.write_results), figures and `seed<N>/{best,last}.pt`. Only
rank 0 writes. The schema of results.json is in docs/outputs.md.
"""
from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import __version__, loop
from .adapters import AdapterConfig, adapter_trains, format_count, load_task_state
from .baselines.backbones import row_label
from .config import eval_only_config, given_fields, report_errors
from .data import DataConfig, build_datasets
from .fileio import load_checkpoint, write_json
from .loop import barrier, setup_distributed
from .metrics import seed_summary
from .precision import inference, resolve_precision
from .tables import row_csv, write_results
from .taskmodel import make_task_model, model_spec
from .viz import save_training_curves


class JsonlLogger:
    """Appends one JSON object per line; a no-op on ranks other than 0."""

    def __init__(self, path, enabled: bool = True):
        self.path, self.enabled = Path(path), enabled   # the folder is made at the first record

    def log(self, **record):
        if self.enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            record.setdefault("time", round(time.time(), 3))
            with open(self.path, "a") as f:
                f.write(json.dumps(record, default=float) + "\n")


def read_jsonl(path) -> list[dict]:
    path = Path(path)
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] \
        if path.exists() else []


def row_name(backbone: str, adapter: str, finetuned: bool, trained: bool | None = None) -> str:
    """The table row a run fills, e.g. "CLIP (Mona, ft.)".

    `trained`: whether the adapter trained in the supervised stage (None: no such stage, as in
    zero-shot). The paper's rows follow the official code's rule (adapters.adapter_trains): Mona
    trains, LoRA does not; a run that differs gets its own row, "CLIP (LoRA, trained)" or
    "CLIP (Mona, frozen)", so it never fills the paper's row.
    """
    if backbone != "clip":  # "BiomedCLIP", "BiomedCLIP (Mona)", "ResNet18", "unet", ...
        return row_label(backbone, adapter)
    name = {"none": "vanilla", "lora": "LoRA", "mona": "Mona"}[adapter]
    if trained is not None and adapter != "none" and trained != adapter_trains(adapter):
        name += ", trained" if trained else ", frozen"
    return f"CLIP ({name}{', ft.' if finetuned else ''})"


def default_out_dir(script: str, dataset: str, row: str) -> Path:
    slug = row.replace("CLIP (", "clip-").replace(" (", "-").replace(", ", "-").replace(")", "") \
        .replace(".", "")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return Path("runs") / script / f"{dataset}-{slug.lower().replace(' ', '-')}-{stamp}"


def summarize_seeds(per_seed: list[dict], keys) -> dict:
    """{metric: {mean, std, per_seed}} over the seeds' test means, as the tables report them
    (metrics.seed_summary per metric)."""
    return {k: seed_summary([r[k] for r in per_seed]) for k in keys}


def fmt(value) -> str:
    return "n/a" if value is None else f"{value:.4f}"


# results.json's keys that more than one script writes, in this order; a script's own keys follow,
# then data, config and version (schema: docs/outputs.md)
SHARED_KEYS = ("script", "task", "dataset", "row", "backbone", "adapter", "init", "seeds", "metrics",
               "units", "n_test", "n_dropped", "machine", "precision")
RANDOM_WEIGHTS = "random weights: these numbers say nothing about CLIP"


def make_results(*, script: str, task: str, dataset: str, row: str, backbone: str, adapter: str,
                 seeds: list, metrics: dict, precision: str, data: dict, config,
                 random_weights: bool = False, **extra) -> dict:
    """results.json of any script: the keys every script writes; init, units, n_test, n_dropped
    and machine where the script passes them; its own keys (`extra`); a warning when the
    weights were random. `config` is the script's config dataclass."""
    given = {"script": script, "task": task, "dataset": dataset, "row": row, "backbone": backbone,
             "adapter": adapter, "seeds": seeds, "metrics": metrics, "precision": precision, **extra}
    out = {k: given.pop(k) for k in SHARED_KEYS if k in given}
    out.update(given)  # the script's own keys
    out.update(data=data, config=dataclasses.asdict(config), version=__version__)
    if random_weights:
        out["warning"] = RANDOM_WEIGHTS
    return out


def machine(device) -> str:
    """The device and the CPU's vector extensions: what a run's timings and bf16 depend on."""
    return f"{device.type}, CPU capability {torch.backends.cpu.get_cpu_capability()}"


# ----------------------------------------------------------------------------- one run
@dataclass
class Run:
    """What a script knows once it has started: config, ranks, output folder, log."""
    cfg: object
    script: str
    rank: int
    world: int
    device: torch.device
    row: str
    out: Path
    log: object
    ckpt: dict | None = None  # the --eval-only checkpoint
    precision: str = "fp32"   # what --precision resolved to here (precision.resolve_precision)
    weights_cache: dict = field(default_factory=dict)  # backbone weights, shared by the seeds

    @property
    def main(self) -> bool:
        return self.rank == 0

    def save_config(self):
        """config.json, written once the data have passed their checks: a run that fails them
        leaves an existing run folder as it was (and makes no new one)."""
        if self.main:
            write_json(self.out / "config.json", dataclasses.asdict(self.cfg))

    def checkpoint_extra(self, seed: int, **more) -> dict:
        """What every checkpoint of this run holds beside the tensors."""
        return {"config": dataclasses.asdict(self.cfg), "seed": seed, "script": self.script,
                **more}

    def adapter_config(self) -> AdapterConfig:
        """The adapter the command line asks for (settings other than the kind: the paper's)."""
        shared = getattr(self.cfg, "lora_shared_dropout", False)
        if shared and self.cfg.adapter != "lora":
            raise ValueError(f"--lora-shared-dropout is for --adapter lora, not --adapter "
                             f"{self.cfg.adapter}")
        return AdapterConfig(kind=self.cfg.adapter, lora_shared_dropout=shared)

    def task_model(self, seed: int, task: str, adapter_cfg, **kw):
        """The seed's model (taskmodel.make_task_model), its parameter count on the console, and
        with --eval-only the checkpoint's weights loaded. Weights are read once per run."""
        model = make_task_model(model_spec(self.cfg, adapter_cfg), task, self.weights_cache,
                                self.device, seed, **kw)
        if self.main:
            print(f"seed {seed}: parameters {format_count(model)}")
        if self.ckpt is not None:
            load_task_state(model, self.ckpt)
        return model

    def inference(self, model):
        """The context of a validation or test pass: inference mode, folded QuickGELU and the
        resolved --precision (clip_us/precision.py)."""
        return inference(model, self.precision, self.device)

    def train_args(self, seed: int, adapter_cfg, metric: str) -> dict:
        """loop.train's keywords for one seed: the recipe from the config (loop.Settings),
        checkpoints in seed<N>/, rank 0 writes; `metric` names the validation score."""
        extra = self.checkpoint_extra(seed, adapter_config=dataclasses.asdict(adapter_cfg),
                                      version=__version__)
        return dict(seed=seed, out_dir=self.out / f"seed{seed}", extra=extra, log=self.log,
                    settings=loop.Settings.of(self.cfg, metric=metric), is_main=self.main,
                    resume=self.cfg.resume)

    def results(self, task: str, metrics: dict, units: dict, n_test: int, info: dict,
                **more) -> dict:
        """results.json for this run (make_results); --eval-only adds the data set the
        checkpoint trained on."""
        cfg = self.cfg
        if getattr(cfg, "eval_only", False):
            more["trained_on"] = self.ckpt["config"].get("dataset")
        return make_results(script=f"{self.script}.py", task=task, dataset=cfg.dataset,
                            row=self.row, backbone=cfg.backbone, adapter=cfg.adapter,
                            init=cfg.init or None, seeds=cfg.seeds, metrics=metrics, units=units,
                            n_test=n_test, precision=self.precision,
                            data=info.get("health", {}), config=cfg, **more)

    def finish(self, results: dict, loss_name: str, metric: str):
        """results.json, row.csv and the training curves; the table row on the console."""
        write_results(self.out, results)
        save_loss_curves(self, loss_name, metric)
        print(f"results: {self.out / 'results.json'}")
        print(row_csv(results))


TASK_OF_SCRIPT = {"train_seg": "segmentation", "train_cls": "classification"}


def eval_checkpoint(cfg, script: str) -> dict:
    """The --eval-only checkpoint, refused when missing or trained for the other task."""
    if not cfg.checkpoint:
        raise ValueError(f"--eval-only needs --checkpoint PATH: the seed<N>/best.pt of a "
                         f"finished {script}.py run")
    ckpt = load_checkpoint(cfg.checkpoint)
    trained_by = ckpt.get("script")
    if trained_by in TASK_OF_SCRIPT and script in TASK_OF_SCRIPT and trained_by != script:
        raise ValueError(f"{cfg.checkpoint} was trained by {trained_by}.py for "
                         f"{TASK_OF_SCRIPT[trained_by]}; {script}.py --eval-only needs a "
                         f"{TASK_OF_SCRIPT[script]} checkpoint (or run {trained_by}.py --eval-only)")
    return ckpt


def start_run(cfg, script: str) -> Run:
    """Join DDP, resolve --eval-only, print what runs. Nothing is written here:
    config.json follows once the data are checked (Run.save_config, from supervised_data)."""
    report_errors(cfg.debug)
    ckpt = eval_checkpoint(cfg, script) if cfg.eval_only else None
    if ckpt is not None:
        cfg = eval_only_config(cfg, ckpt, given_fields(type(cfg)))
    rank, world, device = setup_distributed(cfg.device)
    row = row_name(cfg.backbone, cfg.adapter, bool(cfg.init),
                   adapter_trains(cfg.adapter, cfg.adapter_train))
    out = Path(cfg.out_dir or default_out_dir(script, cfg.dataset, row))
    if rank == 0:
        what = f"evaluating {cfg.checkpoint}" if cfg.eval_only else \
            f"seeds {' '.join(map(str, cfg.seeds))}, up to {cfg.epochs} epochs"
        print(f"{script}.py: {row} on {cfg.dataset}, {what}, {world} process(es) on {device}; "
              f"output {out} (config.json has every setting)")
    log = JsonlLogger(out / "log.jsonl", enabled=rank == 0).log
    precision = resolve_precision(cfg.precision, device, verbose=rank == 0)
    return Run(cfg, script, rank, world, device, row, out, log, ckpt, precision)


CROP = {"auto": None, "yes": True, "no": False}  # --crop -> DataConfig.crop


def supervised_data(run: Run, task: str):
    """(train, val, test, info) for a run; with --eval-only the whole data set is the test set,
    as for an external set such as LN-2."""
    cfg = run.cfg
    data_cfg = DataConfig(
        dataset=cfg.dataset, root=cfg.data_root or None, task=task, size=cfg.image_size,
        clip_norm=cfg.clip_norm, skip_bad=cfg.skip_bad, nextgen_name=cfg.nextgen_name or None,
        split_path=str(run.out / "split.json"), split_file=cfg.split_file or None,
        crop=CROP[cfg.crop], mask_threshold=cfg.mask_threshold, train_aug=not cfg.eval_only,
        require_split=not cfg.eval_only,   # --eval-only tests every image: no minimum size
        keep_normal=cfg.keep_normal, phantom_n=cfg.phantom_n, phantom_size=cfg.phantom_size)
    # Rank 0 writes the phantom and split.json; the other ranks then read them.
    if not run.main:
        barrier()
    train, val, test, info = build_datasets(data_cfg)
    run.save_config()
    if run.main:
        barrier()
    if cfg.eval_only:
        test = torch.utils.data.ConcatDataset([train, val, test])
    if run.main and cfg.eval_only:
        print(f"data: {len(test)} images, every one evaluated (--eval-only)")
    elif run.main:
        print(f"data: {len(train)} train / {len(val)} val / {len(test)} test images")
    return train, val, test, info


def supervised_step(loss_fn, target: str, device):
    """loop.train's `loss_step` for the data sets here: loss_fn(logits, batch[target]), where
    target is "mask" (seg) or "label" (cls); logits in fp32 even under bf16 autocast."""
    def loss_step(batch, model):
        logits = model(batch["image"].to(device)).float()  # [B, classes(, H, W)]
        return loss_fn(logits, batch[target].to(device))
    return loss_step


def save_loss_curves(run: Run, loss_name: str, metric: str):
    """loss.svg from log.jsonl: training loss and validation metric, one curve per seed."""
    records = read_jsonl(run.out / "log.jsonl")
    if any("loss" in r for r in records):
        save_training_curves(records, run.out / "loss.svg", metric, loss_name=loss_name,
                             title=run.row)
