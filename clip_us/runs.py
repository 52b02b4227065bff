"""One run of a script: its output folder, JSONL log, row name, data and the seeds' summary.

Every script writes one folder (`--out-dir`, default `runs/<script>/<dataset>-<row>-<time>`):
`config.json` (the resolved config), `log.jsonl` (one JSON object per epoch, validation and test),
`results.json` + `row.csv` (tables.write_results), figures and `seed<N>/{best,last}.pt`. Only
rank 0 writes. The schema of results.json is in docs/outputs.md. The folder is written once
(RunFolder): made at the run's first batch, never overwritten once finished.
"""
from __future__ import annotations

import dataclasses
import json
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import __version__, loop
from .adapters import (
    ADAPTER_LABELS,
    SUPERVISED,
    AdapterConfig,
    adapter_trains,
    check_identity,
    check_init,
    checkpoint_identity,
    describe,
    format_count,
    identity,
    load_task_state,
    read_adapter,
    supervised_train,
)
from .baselines.backbones import row_label
from .config import (
    command_line,
    eval_only_config,
    given_fields,
    on_interrupt,
    report_errors,
    row_defaults,
)
from .data import DataConfig, build_datasets
from .fileio import load_checkpoint, write_json
from .loop import barrier, setup_distributed
from .metrics import seed_summary
from .precision import inference, resolve_precision
from .splits import save_split
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


def row_name(backbone: str, adapter: str, finetuned: bool, trained: bool | None = None,
             init_by: str = "", train: str = "") -> str:
    """The table row a run fills, e.g. "CLIP (Mona, ft.)".

    `finetuned`: the run started from --init; `init_by`: the script that wrote that file. A
    contrastive fine-tune (train_contrastive.py, the official files) makes the paper's "ft." rows;
    a train_seg/train_cls checkpoint is named as what it is, "CLIP (Mona, init: train_seg)".
    `trained`: whether the adapter trained in the supervised stage (None: no such stage, as in
    zero-shot). The paper's rows follow the official code's rule (adapters.adapter_trains): Mona
    trains, LoRA does not; a run that differs gets its own row, "CLIP (LoRA, trained)" or
    "CLIP (Mona, frozen)", so it never fills the paper's row. `train`: a contrastive
    fine-tune's --train mode, which names a row without an adapter, "CLIP (full, ft.)".
    """
    note = f"init: {init_by}" if init_by in SUPERVISED else "ft."
    if backbone != "clip":  # "BiomedCLIP", "BiomedCLIP (Mona)", "ResNet18", "unet", ...
        label = row_label(backbone, adapter)
        if not finetuned:
            return label
        return f"{label[:-1]}, {note})" if label.endswith(")") else f"{label} ({note})"
    name = train if adapter == "none" and train else ADAPTER_LABELS[adapter]
    if trained is not None and adapter != "none" and trained != adapter_trains(adapter):
        name += ", trained" if trained else ", frozen"
    return f"CLIP ({name}{', ' + note if finetuned else ''})"


def slug(name: str) -> str:
    """A folder name from a row or data set name: lower case, each run of characters other than
    [a-z0-9_] as one '-' ("CLIP (Mona, init: train_seg)" -> "clip-mona-init-train_seg")."""
    return re.sub(r"[^a-z0-9_]+", "-", name.lower()).strip("-") or "model"


def dataset_name(dataset: str, nextgen_name: str | None = "") -> str:
    """The data set a run's results name: the NextGen-UIA layout's <DS> (--nextgen-name LN-1)
    when given, as the tables file LN-1 and LN-2 under their own names; else --dataset."""
    return nextgen_name or dataset


def default_out_dir(script: str, *names: str) -> Path:
    """The default --out-dir of every script: runs/<script>/<names, slugged>-<time>."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return Path("runs") / script / "-".join([*map(slug, names), stamp])


def summarize_seeds(per_seed: list[dict], keys) -> dict:
    """{metric: {mean, std, per_seed}} over the seeds' test means, as the tables report them
    (metrics.seed_summary per metric)."""
    return {k: seed_summary([r[k] for r in per_seed]) for k in keys}


def fmt(value) -> str:
    return "n/a" if value is None else f"{value:.4f}"


# results.json's keys that more than one script writes, in this order; a script's own keys follow,
# then data, config and version (schema: docs/outputs.md)
SHARED_KEYS = ("script", "task", "dataset", "row", "backbone", "adapter", "init", "init_from", "seeds",
               "metrics", "units", "n_test", "n_dropped", "machine", "precision")
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
    # argv: the command line as given, which clip_us.reproduce compares to tell its runs apart
    out.update(data=data, config=dataclasses.asdict(config), argv=sys.argv[1:],
               version=__version__)
    if random_weights:
        out["warning"] = RANDOM_WEIGHTS
    return out


def machine(device) -> str:
    """The device and the CPU's vector extensions: what a run's timings and bf16 depend on."""
    return f"{device.type}, CPU capability {torch.backends.cpu.get_cpu_capability()}"


# ----------------------------------------------------------------------------- the run folder
RESUMED_AS = ("script", "backbone", "adapter", "train")  # what --resume checks of a last.pt


def last_checkpoints(folder: Path) -> list[Path]:
    """A run folder's last.pt files (one per seed, or one), the newest first."""
    found = [p for p in (folder / "last.pt", *folder.glob("seed*/last.pt")) if p.is_file()]
    return sorted(found, key=lambda p: p.stat().st_mtime, reverse=True)


@dataclass
class RunFolder:
    """A run's output folder, written once. `check`, before any work, refuses a folder that holds
    another run and --resume with nothing to resume; `begin`, at the run's first batch, makes
    the folder. So a run refused or failed before its first batch leaves nothing behind, a
    finished run is never overwritten, and log.jsonl never holds two runs. A folder that holds
    no checkpoint and no results (a run stopped before its first epoch ended) takes a new run.
    `resume`: --resume, None for a script without it (zeroshot.py); `given`: --out-dir named it
    (not the timestamped default); `main`: this rank writes."""
    path: Path
    resume: bool | None = None
    given: bool = True
    main: bool = True
    expect: dict = field(default_factory=dict)  # the record of this run's checkpoints (identity)
    split: dict | None = None  # a new split.json (record and parts), written by begin
    started: bool = False

    def check(self) -> None:
        """Before any work: exit 2 on a folder holding another run, or on --resume without a
        last.pt; --resume on a finished run says so and exits 0. From here, Ctrl-C says what
        this run saved (config.on_interrupt)."""
        on_interrupt(self.interrupted)
        last = last_checkpoints(self.path)
        if (self.path / "results.json").is_file():
            self._finished()
        if last and not self.resume:
            raise FileExistsError(f"{self.path} holds an unfinished run "
                                  f"({last[0].relative_to(self.path)}): continue it with "
                                  f"--resume, or pass a new --out-dir")
        if self.resume and not last:
            raise FileNotFoundError(f"--resume: {self.path} holds no last.pt, so there is "
                                    f"nothing to resume; pass the --out-dir of the run to go on "
                                    f"with, or drop --resume to start a new run")
        if self.resume:
            check_identity(last[0], "Resume it with the flags that started it, or pass a new "
                           "--out-dir without --resume",
                           **{k: self.expect[k] for k in RESUMED_AS if k in self.expect})

    def _finished(self):
        """A finished run's folder: --resume reports it (exit 0); anything else is refused."""
        if self.resume:
            if self.main:
                print(f"{self.path} holds a finished run (results.json): nothing to resume, "
                      f"nothing changed")
            sys.exit(0)
        also = "" if self.resume is None else " (--resume there only reports it is finished)"
        raise FileExistsError(f"{self.path} holds a finished run (results.json), which is never "
                              f"overwritten: pass a new --out-dir{also}")

    def begin(self, config) -> None:
        """The run's first batch: make the folder, with config.json (`config`, the resolved
        config dataclass) and the new split.json; a log.jsonl of an attempt that saved nothing
        goes. A resumed run keeps its files. Once per run."""
        if self.started:
            return
        self.started = True
        if self.main and not self.resume:
            (self.path / "log.jsonl").unlink(missing_ok=True)
            write_json(self.path / "config.json", dataclasses.asdict(config))
            if self.split:
                save_split(self.path / "split.json", self.split)

    def interrupted(self) -> str:
        """The Ctrl-C line: what the run saved, and the command that goes on from there."""
        out_dir = () if self.given else ("--out-dir", str(self.path))
        last = last_checkpoints(self.path)
        if not last:  # a folder already made takes the new run
            again = out_dir if self.started else ()
            return f"nothing saved yet; to start again: {command_line(*again)}"
        epoch = load_checkpoint(last[0]).get("epoch")
        resume = () if self.resume else ("--resume",)
        return f"saved {last[0]} (epoch {epoch}); to go on: {command_line(*resume, *out_dir)}"


# ----------------------------------------------------------------------------- one run
def run_identity(cfg, script: str, init_from: dict | None) -> dict:
    """The record (adapters.identity) every checkpoint of a train_seg/train_cls run holds."""
    return identity(script, SUPERVISED[script], cfg.backbone, cfg.adapter,
                    supervised_train(cfg.adapter, cfg.adapter_train), init_from)


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
    folder: RunFolder | None = None  # `out`, written once (checked in start_run)
    init_from: dict | None = None  # what --init's file is, with its path (init_checkpoint)

    @property
    def main(self) -> bool:
        return self.rank == 0

    def begin(self):
        """The first batch follows: everything before was validation, and the run folder is made
        now, with config.json and split.json (RunFolder.begin)."""
        self.folder.begin(self.cfg)

    def checkpoint_extra(self, seed: int, **more) -> dict:
        """What every checkpoint of this run holds beside the tensors, its record (`what`,
        adapters.identity) included."""
        return {"config": dataclasses.asdict(self.cfg), "seed": seed, "script": self.script,
                "what": run_identity(self.cfg, self.script, self.init_from), **more}

    def adapter_config(self) -> AdapterConfig:
        """The adapter the command line asks for (settings other than the kind: the paper's, or
        with --init the file's); with --eval-only the checkpoint's, settings included."""
        shared = getattr(self.cfg, "lora_shared_dropout", False)
        if shared and self.cfg.adapter != "lora":
            raise ValueError(f"--lora-shared-dropout is for --adapter lora, not --adapter "
                             f"{self.cfg.adapter}")
        if self.ckpt is not None and "adapter_config" in self.ckpt:
            saved = AdapterConfig.from_dict(dict(self.ckpt["adapter_config"]))
            return dataclasses.replace(saved, lora_shared_dropout=shared)
        return AdapterConfig(kind=self.cfg.adapter, lora_shared_dropout=shared,
                             mona_variant=self.cfg.mona_variant)

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
            saved = self.ckpt["config"]
            more["trained_on"] = dataset_name(saved.get("dataset"), saved.get("nextgen_name"))
        return make_results(script=f"{self.script}.py", task=task,
                            dataset=dataset_name(cfg.dataset, cfg.nextgen_name),
                            row=self.row, backbone=cfg.backbone, adapter=cfg.adapter,
                            init=cfg.init or None, init_from=self.init_from, seeds=cfg.seeds,
                            metrics=metrics, units=units,
                            n_test=n_test, precision=self.precision,
                            data=info.get("health", {}), config=cfg, **more)

    def finish(self, results: dict, loss_name: str, metric: str):
        """results.json, row.csv and the training curves; the table row on the console."""
        write_results(self.out, results)
        save_loss_curves(self, loss_name, metric)
        print(f"results: {self.out / 'results.json'}")
        print(row_csv(results))


TASK_OF_SCRIPT = {"train_seg": "segmentation", "train_cls": "classification"}


def _not_for_eval_only(what: dict, path, script: str) -> str:
    """Why `script`.py --eval-only refuses a checkpoint (adapters.checkpoint_identity's
    record), and what to type instead."""
    if what["task"] in SUPERVISED.values():
        other = what["script"]
        return (f"{path} was trained by {other}.py for {TASK_OF_SCRIPT[other]}; {script}.py "
                f"--eval-only needs a {TASK_OF_SCRIPT[script]} checkpoint (or run {other}.py "
                f"--eval-only)")
    if what["backbone"] == "echocare":
        return f"{path} is {describe(what)}: evaluate it with evaluate.py --checkpoint {path}"
    return (f"{path} is {describe(what)}, not a {TASK_OF_SCRIPT[script]} model: it has no "
            f"trained head for --eval-only to score; train one on it with {script}.py --init {path}")


def eval_checkpoint(cfg, script: str) -> dict:
    """The --eval-only checkpoint, refused before any work when missing or not a checkpoint of
    `script`'s task (a contrastive fine-tune, the other task, an EchoCare-CLIP model)."""
    if not cfg.checkpoint:
        raise ValueError(f"--eval-only needs --checkpoint PATH: the seed<N>/best.pt of a "
                         f"finished {script}.py run")
    ckpt = load_checkpoint(cfg.checkpoint)
    what = checkpoint_identity(ckpt, cfg.checkpoint)
    if what["task"] != SUPERVISED[script]:
        raise ValueError(_not_for_eval_only(what, cfg.checkpoint, script))
    return ckpt


def init_checkpoint(cfg, ckpt: dict | None = None):
    """(cfg, init_from), before any work: --init checked (adapters.check_init), its adapter kind
    taken as --adapter when that was not given, and its record with its path. With --eval-only
    (`ckpt`, the checkpoint evaluated): the record of the --init that checkpoint started from."""
    if ckpt is not None:
        return cfg, checkpoint_identity(ckpt).get("init")
    if not cfg.init:
        return cfg, None
    given = given_fields(type(cfg))
    init_from = check_init(cfg.init, getattr(cfg, "backbone", "clip"), cfg.arch,
                           cfg.adapter if "adapter" in given else None)
    cfg = dataclasses.replace(cfg, adapter=init_from["adapter"])
    return init_variant(cfg, "mona_variant" in given), init_from


def init_variant(cfg, given: bool):
    """With --init of a Mona file, the run's Mona is the file's variant; a --mona-variant `given`
    that differs is refused. (The official classification script loads its noise_aware
    fine-tune by name into its freq_enhanced Mona: noise_estimator is dropped and freq_filter
    stays at ones, so it computes the baseline Mona with the fine-tuned weights. We do not repeat
    that: docs/reproducing.md.)"""
    if cfg.adapter != "mona":
        return cfg
    variant = read_adapter(cfg.init)[0].mona_variant
    if given and cfg.mona_variant != variant:
        raise ValueError(f"--init {cfg.init} holds a {variant} Mona but --mona-variant "
                         f"{cfg.mona_variant} was given: drop --mona-variant (the file's is used) "
                         f"or pass --mona-variant {variant}")
    return dataclasses.replace(cfg, mona_variant=variant)


def run_row(cfg, init_from: dict | None) -> str:
    """The row of a train_seg/train_cls run (row_name), from what --init loaded."""
    return row_name(cfg.backbone, cfg.adapter, bool(init_from),
                    adapter_trains(cfg.adapter, cfg.adapter_train),
                    (init_from or {}).get("script", ""))


def start_run(cfg, script: str) -> Run:
    """Join DDP, resolve --eval-only, check the run folder, print what runs. Nothing is written
    here: the folder is made at the first batch (Run.begin)."""
    report_errors(cfg.debug)
    ckpt = eval_checkpoint(cfg, script) if cfg.eval_only else None
    if ckpt is not None:
        cfg = eval_only_config(cfg, ckpt, given_fields(type(cfg)))
    cfg, init_from = init_checkpoint(row_defaults(cfg), ckpt)  # --epochs/--batch-size 0: the row's
    rank, world, device = setup_distributed(cfg.device)
    row = run_row(cfg, init_from)
    out = Path(cfg.out_dir or default_out_dir(script, cfg.dataset, row))
    resume = None if cfg.eval_only else cfg.resume  # (the checkpoint's config may say True)
    folder = RunFolder(out, resume, given=bool(cfg.out_dir), main=rank == 0,
                       expect=run_identity(cfg, script, init_from))
    folder.check()
    if rank == 0:
        what = f"evaluating {cfg.checkpoint}" if cfg.eval_only else \
            f"seeds {' '.join(map(str, cfg.seeds))}, up to {cfg.epochs} epochs"
        print(f"{script}.py: {row} on {cfg.dataset}, {what}, {world} process(es) on {device}; "
              f"output {out} (config.json has every setting)")
    log = JsonlLogger(out / "log.jsonl", enabled=rank == 0).log
    precision = resolve_precision(cfg.precision, device, verbose=rank == 0)
    return Run(cfg, script, rank, world, device, row, out, log, ckpt, precision, folder=folder,
               init_from=init_from)


CROP = {"auto": None, "yes": True, "no": False}  # --crop -> DataConfig.crop


def data_config(cfg, task: str, split_path: str | None, **script_own) -> DataConfig:
    """DataConfig from the data set options train_seg.py, train_cls.py and zeroshot.py share
    (FolderOptions, DataOptions, PhantomOptions, image size and normalisation). The run folder
    saves a new split (write_split=False); `script_own`: the fields a script decides itself."""
    return DataConfig(dataset=cfg.dataset, root=cfg.data_root or None, task=task,
                      size=cfg.image_size, clip_norm=cfg.clip_norm, skip_bad=cfg.skip_bad,
                      nextgen_name=cfg.nextgen_name or None, crop=CROP[cfg.crop],
                      split_path=split_path, write_split=False, split_file=cfg.split_file or None,
                      phantom_n=cfg.phantom_n, phantom_size=cfg.phantom_size, **script_own)


def supervised_data(run: Run, task: str):
    """(train, val, test, info) for a run; with --eval-only the whole data set is the test set,
    as for an external set such as LN-2."""
    cfg = run.cfg
    data_cfg = data_config(cfg, task, str(run.out / "split.json"),
                           mask_threshold=cfg.mask_threshold, keep_normal=cfg.keep_normal,
                           train_aug=not cfg.eval_only,
                           require_split=not cfg.eval_only)  # --eval-only: every image, any size
    # Rank 0 writes the phantom; the other ranks then read it (and make the same seeded split).
    if not run.main:
        barrier()
    train, val, test, info = build_datasets(data_cfg)
    run.folder.split = info.pop("new_split")  # split.json, written when the run begins
    if run.main:
        barrier()
    if cfg.eval_only:
        test = torch.utils.data.ConcatDataset([train, val, test])
    if run.main:
        print(f"data: {len(test)} images, every one evaluated (--eval-only)" if cfg.eval_only
              else f"data: {len(train)} train / {len(val)} val / {len(test)} test images")
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
