"""The plan of a whole table: every run that Table 2 or 3 of Qu et al., "Adapting Vision-Language
Foundation Model for Next Generation Medical Ultrasound Image Analysis", or EchoCare-CLIP's
("Ultrasound Vision-Language Alignment via Contrastive Learning") held-out table needs, as
commands of the five scripts. `python -m clip_us.reproduce` (clip_us/reproduce/__main__.py)
prints, emits or runs it.

Each row is written once, in ROWS: its script, its flags and its data sets. The row table of
docs/reproducing.md is `rows_markdown()` (a test keeps the two equal). A plan is a list of Jobs in
an order where every job comes after the jobs it needs: the contrastive stage before the "ft."
rows that start from its checkpoint, LN-1's runs before LN-2's, which evaluate LN-1's
checkpoints (LN-2 is the paper's external test set).
"""
from __future__ import annotations

import shlex
from dataclasses import dataclass, field
from pathlib import Path

from ..config import opt, required
from ..runs import slug
from ..tables import DATASETS as TABLE_DATASETS
from ..tables import ROWS as TABLE_ROWS
from ..tables import canonical

TABLES = ("table2", "table3", "echocare")


# ----------------------------------------------------------------------------- the data sets
@dataclass(frozen=True)
class DataSet:
    """One folder under --data-root: its name there, the layout flags, where to get it."""
    name: str
    flags: tuple
    source: str


DATA = {d.name: d for d in (
    DataSet("BUSI", ("--dataset", "busi"), "public: Al-Dhabyani et al., Data in Brief 28 (2020), "
            "doi:10.1016/j.dib.2019.104863; the folder as downloaded (benign/, malignant/, "
            "normal/)"),
    DataSet("TN3K", ("--dataset", "tn3k"), "public: Gong et al., Comput. Biol. Med. 155 (2023), "
            "doi:10.1016/j.compbiomed.2022.106389 (trainval-image/, trainval-mask/, test-image/, "
            "test-mask/)"),
    DataSet("DDTI", ("--dataset", "ddti"), "public: Pedraza et al., SPIE 9287 (2015), "
            "doi:10.1117/12.2073532 (images/ and masks/ by file stem)"),
    DataSet("Prostate", ("--dataset", "prostate"), "public: MicroSegNet (Jiang et al., CMIG 112, "
            "2023), as the NextGen-UIA release's 2-D PNG slices"),
    DataSet("LN-1", ("--dataset", "nextgen", "--nextgen-name", "LN-1"), "NOT PUBLIC: the paper's "
            "in-house lymph-node set (1,273 images); ask the authors; the NextGen-UIA layout "
            "(all/images, all/masks, segmentation/LN-1/, classification/LN-1/)"),
    DataSet("LN-2", ("--dataset", "nextgen", "--nextgen-name", "LN-2"), "NOT PUBLIC: the "
            "paper's in-house external lymph-node test set (374 images); ask the authors; the "
            "NextGen-UIA layout, as LN-1"),
    DataSet("phantom", ("--dataset", "phantom"), "built in (synthetic, no download)"),
    DataSet("EchoCare", (), "EchoCare-CLIP's image-caption manifests under echocare/ "
            "(docs/reproducing.md)"),
)}
EXTERNAL = {"LN-2": "LN-1"}  # evaluated with the checkpoints trained on the other set
# The contrastive stage's captions under --data-root (the NextGen-UIA release's file names),
# merged in this order as the official code merges them; EchoCare-CLIP's manifests.
CAPTIONS = {"MedPix": "medpix/medpix_dataset.csv", "PMC-CURD": "pmc_curd/pmc_curd_dataset.csv"}
# EchoCare-CLIP: the training captions (template, LLM-refined) and the held-out BUSI captions the
# evaluation scores (the authors' held-out table: BUSI never trained on)
ECHOCARE_CAPTIONS = {"template": "echocare/captions.csv", "llm": "echocare/captions_llm.csv",
                     "busi": "echocare/busi.csv"}
CAPTION_SOURCE = ("the NextGen-UIA release's caption sets (docs/contrastive.md), or a manifest "
                  "written by python -m clip_us.captions")
ECHOCARE_SOURCE = ("EchoCare-CLIP's image-caption manifest (image_path,text_caption,label with a "
                   "dataset column; docs/evaluation.md), e.g. from python -m clip_us.captions")


# ----------------------------------------------------------------------------- the rows
@dataclass(frozen=True)
class Row:
    """One table row: the script and flags that make it, on which data sets.

    `clip`: a CLIP ViT row, which --arch, --weights and --image-size reach (the baselines keep
    their own full-size models); `init`: the contrastive stage ("lora"/"mona") an ft. row starts
    from; `train`: the EchoCare-CLIP training run an evaluation row evaluates."""
    table: str
    task: str
    name: str
    script: str
    flags: tuple = ()
    datasets: tuple = ()
    clip: bool = True
    init: str = ""
    train: tuple = ()


SEG_SETS = ("LN-1", "LN-2", "BUSI", "DDTI", "TN3K", "Prostate")
CLS_SETS = ("LN-1", "LN-2", "BUSI")
NONE = ("--adapter", "none")
DINOV2 = (*NONE, "--backbone", "dinov2", "--image-size", "518", "--dinov2-official")


def _supervised(table, task, script, sets, first):
    """The rows Tables 2 and 3 share, in the paper's order, after the table's own first row."""
    return [Row(table, task, *first, datasets=sets, clip=False),
            Row(table, task, "CLIP (LoRA)", script, ("--adapter", "lora"), sets),
            Row(table, task, "CLIP (LoRA, ft.)", script, ("--adapter", "lora"), sets, init="lora"),
            *([Row(table, task, "CLIPSeg", script, (*NONE, "--backbone", "clipseg"), sets,
                   clip=False)] if task == "seg" else []),
            *[Row(table, task, name, script, (*NONE, "--backbone", name.lower()), sets, clip=False)
              for name in ("BiomedCLIP", "UniMedCLIP", "MetaCLIP")],
            Row(table, task, "DINOv2", script, DINOV2, sets, clip=False),
            Row(table, task, "CLIP (Mona)", script, ("--adapter", "mona"), sets),
            Row(table, task, "CLIP (Mona, ft.)", script, ("--adapter", "mona"), sets, init="mona")]


def _zeroshot():
    z = lambda name, flags, init="": Row("table3", "zeroshot", name, "zeroshot.py", flags,  # noqa: E731
                                         CLS_SETS, init=init)
    return [z("CLIP (vanilla)", ()), z("CLIP (LoRA)", ("--adapter", "lora")),
            z("CLIP (LoRA, ft.)", ("--adapter", "lora"), "lora"),
            z("CLIP (Mona)", ("--adapter", "mona")),
            z("CLIP (Mona, ft.)", ("--adapter", "mona"), "mona")]


# EchoCare-CLIP: the authors' baselines, and their dual encoder trained as each published row
# (its train_contrastive.py flags, its captions: ECHOCARE_CAPTIONS' key)
ECHOCARE_TRAIN = {
    "EchoCare-CLIP (clip text, heads)": (("--text-encoder", "clip", "--train", "heads"), "template"),
    "EchoCare-CLIP (clip text, image)": (("--text-encoder", "clip", "--train", "image"), "template"),
    "EchoCare-CLIP (bert text, full)": (("--text-encoder", "bert", "--train", "full"), "template"),
    "EchoCare-CLIP (clip text, heads, LLM captions)": (("--text-encoder", "clip", "--train",
                                                        "heads"), "llm"),
}


def _echocare():
    e = lambda name, flags, train=(): Row("echocare", "align", name, "evaluate.py", flags,  # noqa: E731
                                          ("EchoCare",), clip=False, train=train)
    return [e("OpenAI CLIP (ViT-B/32)", ("--weights", "ViT-B/32")),
            e("BiomedCLIP", ("--weights", "biomedclip")),
            *[e(name, (), train) for name, train in ECHOCARE_TRAIN.items()]]


ROWS = (_supervised("table2", "seg", "train_seg.py", SEG_SETS, ("UNet", "train_seg.py",
                                                               (*NONE, "--backbone", "unet")))
        + _supervised("table3", "cls", "train_cls.py", CLS_SETS,
                      ("ResNet18", "train_cls.py", (*NONE, "--backbone", "resnet18")))
        + _zeroshot() + _echocare())
STAGES = {"lora": "contrastive stage (LoRA)", "mona": "contrastive stage (Mona)"}


def table_rows(table: str) -> list[Row]:
    return [r for r in ROWS if r.table == table]


def table_datasets(table: str) -> list[str]:
    """A table's data sets, in the order of its rows' first use."""
    return list(dict.fromkeys(d for r in table_rows(table) for d in r.datasets))


# ----------------------------------------------------------------------------- the command line
@dataclass(kw_only=True)
class ReproduceConfig:
    """Plan, emit or run every run of a table, then render it beside the paper's numbers."""
    table: str = required("table2 (segmentation), table3 (classification and zero-shot) or "
                          "echocare (EchoCare-CLIP's held-out evaluation)", positional=True,
                          choices=list(TABLES))
    data_root: str = opt("data", "folder with one folder per data set (BUSI, TN3K, DDTI, "
                         "Prostate, LN-1, LN-2) and the caption manifests (docs/reproducing.md)")
    rows: list = opt([], "rows to run, by the table's names, e.g. 'CLIP (Mona)' (default: all)")
    datasets: list = opt([], "data sets to run: the table's folder names, or phantom (built in, "
                         "no download) (default: all of the table's)")
    seeds: list = opt([], "seeds, one run each (default: 1 2 3 for Tables 2 and 3, as the "
                      "paper; 42 for echocare, the authors')", type=int)
    out: str = opt("runs/reproduce", "folder of every run, log and rendered table; finished "
                   "runs there are skipped, killed ones resumed")
    arch: str = opt("", "CLIP architecture of the CLIP rows ('' = each script's, ViT-B/16); "
                    "tiny for a smoke run (the baselines keep their full-size models)")
    weights: str = opt("", "CLIP weights of the CLIP rows ('' = each script's); none = random "
                       "weights for every row (the baselines' too), for smoke runs")
    image_size: int = opt(0, "input side of the CLIP rows (0 = each row's)", min=0)
    epochs: int = opt(0, "maximum epochs of every training run (0 = each row's official "
                      "default)", min=0)
    eval_every: int = opt(0, "validate every N epochs (0 = the scripts' 10)", min=0)
    phantom_n: int = opt(0, "phantom images (0 = each script's)", min=0)
    device: str = opt("", "--device of every run ('' = each script's auto)")
    precision: str = opt("", "--precision of every run ('' = each script's fp32)",
                         choices=["", "fp32", "bf16"])
    nproc_per_node: int = opt(0, "run each training run with torchrun on N processes (0 = "
                              "python, one process)", min=0)
    dry_run: bool = opt(False, "print the plan, one command per line, and exit (the data is not "
                        "looked at)")
    emit: list = opt([], "write the plan for a scheduler instead of running it: slurm FILE (an "
                     "array job, one task per run) (default: none, run it here)", nargs=2,
                     metavar=("KIND", "FILE"))
    debug: bool = opt(False, "show the traceback of an error")


# ----------------------------------------------------------------------------- the plan
SCRIPTS_DIR = Path(__file__).resolve().parents[2]  # train_seg.py & co. sit beside clip_us/
SINGLE_PROCESS = ("zeroshot.py", "evaluate.py")  # no DDP: never under torchrun


def script_path(script: str) -> str:
    """The script as the commands name it: relative to the working directory when that is the
    repository (train_seg.py, as docs/reproducing.md writes it), else its full path."""
    path = SCRIPTS_DIR / script
    return script if Path.cwd().resolve() == SCRIPTS_DIR else str(path)


@dataclass
class Job:
    """One run of the plan: one script, one row (or, for evaluate.py, the rows it scores), one
    data set, one seed."""
    key: str                 # its run folder under --out, unique in the plan
    row: str
    dataset: str             # the data set's folder name (DATA)
    seed: int | None
    script: str
    args: list
    out_dir: str
    needs: list = field(default_factory=list)  # keys of the jobs that must finish first
    cells: list = field(default_factory=list)  # the tables' (task, dataset, row) it fills
    results: list = field(default_factory=list)  # its results.json files ([] = out_dir's one)

    def __post_init__(self):
        self.results = self.results or [str(Path(self.out_dir) / "results.json")]

    def argv(self, nproc: int = 0, python: str = "python") -> list[str]:
        """The command; torchrun with --nproc-per-node N (zero-shot and evaluate.py: one
        process, they have no DDP)."""
        if nproc and self.script not in SINGLE_PROCESS:
            launch = ["torchrun", "--standalone", "--nproc-per-node", str(nproc)]
        else:
            launch = [python]
        return [*launch, script_path(self.script), *self.args, "--out-dir", self.out_dir]

    def command(self, nproc: int = 0) -> str:
        return shlex.join(self.argv(nproc))


def _pick(given: list, known: list, what: str, table: str, default=None) -> list:
    """The named items of `known` (matched as the tables match names: tables.canonical), in
    the table's order; `default` (all of them) when none is named. An unknown name is an error
    listing them."""
    chosen = {canonical(g, known) for g in given}
    bad = [g for g in given if canonical(g, known) not in known]
    if bad:
        raise ValueError(f"{table} has no {what} {', '.join(map(repr, bad))}; its {what}s: "
                         f"{', '.join(known)}")
    return [k for k in known if k in (chosen or set(default or known))]


def _flags(**given) -> list[str]:
    """--name value for each given setting ('' and 0 are "not given": the script's default)."""
    out = []
    for name, value in given.items():
        if value not in ("", 0, None):
            out += [f"--{name.replace('_', '-')}", str(value)]
    return out


def _model_flags(cfg, row: Row) -> list[str] | None:
    """--arch/--weights/--image-size for a CLIP row; for the others --weights none only (random
    weights everywhere), else their own published files. None: the row has no such form."""
    if row.clip:
        return _flags(arch=cfg.arch, weights=cfg.weights, image_size=cfg.image_size)
    if cfg.weights != "none" or "unet" in row.flags:  # UNet has no pretrained weights
        return [] if row.task != "align" or row.train else list(row.flags)
    if row.task == "align" and row.train:
        return ["--weights", "none"]  # EchoCare-CLIP's encoders, random
    if row.task == "align":  # the authors' baselines: a random CLIP of that shape, or nothing
        named = row.flags[row.flags.index("--weights") + 1]
        return None if named == "biomedclip" else ["--arch", named, "--weights", "none"]
    return ["--weights", "none"] + (["--clipseg-weights", "none"] if "clipseg" in row.flags else [])


def _phantom(cfg, dataset: str) -> list[str]:
    return _flags(phantom_n=cfg.phantom_n) if dataset == "phantom" else []


def _data_flags(cfg, dataset: str) -> list[str]:
    root = [] if dataset == "phantom" else ["--data-root", str(Path(cfg.data_root) / dataset)]
    return [*DATA[dataset].flags, *root, *_phantom(cfg, dataset)]


def _run_flags(cfg) -> list[str]:
    return _flags(device=cfg.device, precision=cfg.precision)


def _train_flags(cfg, script: str) -> list[str]:
    every = cfg.eval_every if script in ("train_seg.py", "train_cls.py") else 0
    return _flags(epochs=cfg.epochs, eval_every=every)


def _out(cfg, key: str) -> str:
    return str(Path(cfg.out) / key)


def _init(cfg, row: Row) -> tuple[list[str], list[str]]:
    """An ft. row's --init (its contrastive stage's best.pt) and the job it needs."""
    if not row.init:
        return [], []
    return ["--init", str(Path(_out(cfg, f"ft/{row.init}")) / "best.pt")], [f"ft/{row.init}"]


def _stage_job(cfg, kind: str, phantom_only: bool) -> Job:
    """The contrastive stage whose best.pt the ft. rows of this adapter start from: MedPix and
    PMC-CURD merged, as the official code trains (the phantom's captions for a phantom sweep)."""
    manifests = [] if phantom_only else [a for name in CAPTIONS for a in
                                         ("--manifest", str(Path(cfg.data_root) / CAPTIONS[name]))]
    stage = Row("", "", STAGES[kind], "train_contrastive.py")
    args = [*manifests, "--adapter", kind, *_model_flags(cfg, stage),
            *_train_flags(cfg, "train_contrastive.py"),
            *_phantom(cfg, "phantom" if phantom_only else ""), *_run_flags(cfg)]
    key = f"ft/{kind}"
    return Job(key, STAGES[kind], "MedPix + PMC-CURD" if manifests else "phantom", None,
               "train_contrastive.py", args, _out(cfg, key))


def _key(row: Row, dataset: str, seed: int | None, prefix: str = "") -> str:
    tail = f"-seed{seed}" if seed is not None else ""
    return f"{row.table}/{slug(dataset)}/{prefix}{slug(row.name)}{tail}"


def _cell(row: Row, dataset: str) -> tuple:
    return row.task, canonical(dataset, TABLE_DATASETS), canonical(row.name, TABLE_ROWS)


def _supervised_job(cfg, row: Row, dataset: str, seed: int, model: list) -> Job:
    """A train_seg.py / train_cls.py run of one seed; an ft. row starts from its stage."""
    init, needs = _init(cfg, row)
    args = [*_data_flags(cfg, dataset), *row.flags, *init, *model,
            *_train_flags(cfg, row.script), "--seeds", str(seed), *_run_flags(cfg)]
    key = _key(row, dataset, seed)
    return Job(key, row.name, dataset, seed, row.script, args, _out(cfg, key), needs,
               [_cell(row, dataset)])


def _external_job(cfg, row: Row, dataset: str, trained: Job, keys: set) -> Job:
    """LN-2: the paper's external test set, scored by LN-1's checkpoint of the same row and seed
    (--eval-only: the model and its settings come from the checkpoint). It needs that run when
    the plan has it, else a checkpoint of an earlier sweep."""
    ckpt = Path(trained.out_dir) / f"seed{trained.seed}" / "best.pt"
    args = ["--eval-only", "--checkpoint", str(ckpt), *_data_flags(cfg, dataset), *_run_flags(cfg)]
    key = _key(row, dataset, trained.seed)
    return Job(key, row.name, dataset, trained.seed, row.script, args, _out(cfg, key),
               [trained.key] if trained.key in keys else [], [_cell(row, dataset)])


def _zeroshot_job(cfg, row: Row, dataset: str, model: list) -> Job:
    """Zero-shot trains nothing: one run per row and data set, whatever the seeds."""
    init, needs = _init(cfg, row)
    args = [*_data_flags(cfg, dataset), *row.flags, *init, *model, *_run_flags(cfg)]
    key = _key(row, dataset, None, prefix="zeroshot-")
    return Job(key, row.name, dataset, None, row.script, args, _out(cfg, key), needs,
               [_cell(row, dataset)])


def _manifest(cfg, dataset: str, kind: str) -> list[str]:
    """EchoCare-CLIP's manifest of this kind under --data-root (the phantom's: the default)."""
    return [] if dataset == "phantom" else ["--manifest", str(Path(cfg.data_root) /
                                                              ECHOCARE_CAPTIONS[kind])]


def _echocare_train(cfg, row: Row, dataset: str, seed: int, model: list) -> Job:
    """EchoCare-CLIP's dual encoder trained as one published row (the authors' recipe: the
    script's defaults with --model echocare), held-out sets kept out."""
    flags, captions = row.train
    key = f"echocare/{slug(dataset)}/train-{slug(row.name)}-seed{seed}"
    args = ["--model", "echocare", *_manifest(cfg, dataset, captions), *flags, *model,
            *_train_flags(cfg, "train_contrastive.py"), *_phantom(cfg, dataset),
            "--seed", str(seed), *_run_flags(cfg)]
    return Job(key, row.name, dataset, seed, "train_contrastive.py", args, _out(cfg, key))


def _echocare_eval(cfg, rows: list, dataset: str, seed: int, trained: list) -> Job:
    """One evaluate.py run of every chosen model on the held-out BUSI captions, so that all
    rows share one split and one test set (the authors' held-out table: 117 BUSI images)."""
    models, names = [], [r.name for r in rows if r.train] + [r.name for r in rows if not r.train]
    models += [a for j in trained for a in ("--checkpoint", str(Path(j.out_dir) / "best.pt"))]
    models += [a for r in rows if not r.train for a in _model_flags(cfg, r)]
    key = f"echocare/{slug(dataset)}/evaluate-seed{seed}"
    out = _out(cfg, key)
    args = [*_manifest(cfg, dataset, "busi"), *models, *[a for n in names for a in ("--name", n)],
            "--seed", str(seed), *_run_flags(cfg)]
    cells = [("align", "busi", n) for n in names] if dataset != "phantom" else []
    return Job(key, "EchoCare-CLIP evaluation", dataset, seed, "evaluate.py", args, out,
               [j.key for j in trained], cells, [str(Path(out) / slug(n) / "results.json")
                                                  for n in names])


def _echocare_jobs(cfg, rows: list, dataset: str, seeds: list) -> list[Job]:
    """Per seed: each trained row's training, then one evaluation of every row."""
    jobs = []
    for seed in seeds:
        trained = [_echocare_train(cfg, r, dataset, seed, _model_flags(cfg, r))
                   for r in rows if r.train]
        jobs += trained + [_echocare_eval(cfg, rows, dataset, seed, trained)]
    return jobs


def _row_jobs(cfg, row: Row, dataset: str, seeds: list, model: list, keys: set) -> list[Job]:
    """Every run of one row of Table 2 or 3 on one data set."""
    if row.task == "zeroshot":
        return [_zeroshot_job(cfg, row, dataset, model)]
    if dataset in EXTERNAL:
        return [_external_job(cfg, row, dataset, _supervised_job(cfg, row, EXTERNAL[dataset], s,
                                                                 model), keys) for s in seeds]
    return [_supervised_job(cfg, row, dataset, s, model) for s in seeds]


FULL_SIZE = {"UNet": "", "ResNet18": "", "CLIPSeg": "ViT-B/16 and its decoder",
             "BiomedCLIP": "ViT-B/16", "UniMedCLIP": "ViT-B/16", "MetaCLIP": "ViT-B/16",
             "DINOv2": "ViT-B/14 at 518 px", "OpenAI CLIP (ViT-B/32)": "ViT-B/32"}


def _notes(cfg, rows: list[Row], datasets: list) -> list[str]:
    """What a reader of the plan should know: which rows keep their full-size models, what
    reaches no EchoCare-CLIP row, where LN-2's numbers come from."""
    notes, kept = [], {r.name: FULL_SIZE[r.name] for r in rows if r.name in FULL_SIZE}
    if (cfg.arch or cfg.image_size) and kept:
        notes.append("--arch/--image-size reach the CLIP rows only; full size here: " +
                     ", ".join(f"{k} ({v})" if v else k for k, v in kept.items()))
    if any(r.task == "align" for r in rows):
        if cfg.arch or cfg.image_size or cfg.weights not in ("", "none"):
            notes.append("--arch, --image-size and --weights (but none) reach no EchoCare-CLIP "
                         "row: its Swin, text encoders and baselines keep their own")
        if "phantom" in datasets:
            notes.append("evaluate.py scores its own default phantom captions, not the "
                         "--phantom-n phantom the dual encoders trained on")
    if cfg.eval_every and any(r.script != "evaluate.py" and r.init for r in rows):
        notes.append("--eval-every reaches train_seg.py/train_cls.py only; the contrastive "
                     "stage validates every epoch")
    if "LN-2" in datasets and any(r.task in ("seg", "cls") for r in rows):
        notes.append("LN-2 is the external test set: its seg/cls runs are --eval-only runs of "
                     "LN-1's checkpoints (run LN-1 first, or in the same sweep)")
    return notes


def _chosen(cfg) -> tuple[list[Row], list[str], list[int]]:
    """The rows, data sets and seeds the command line picks."""
    if cfg.table not in TABLES:
        raise ValueError(f"no table {cfg.table!r}; choose one of {', '.join(TABLES)}")
    rows = table_rows(cfg.table)
    names = _pick(cfg.rows, list(dict.fromkeys(r.name for r in rows)), "row", cfg.table)
    sets = _pick(cfg.datasets, table_datasets(cfg.table) + ["phantom"], "data set", cfg.table,
                 default=table_datasets(cfg.table))
    seeds = cfg.seeds or ([42] if cfg.table == "echocare" else [1, 2, 3])
    return [r for r in rows if r.name in names], sets, seeds


def plan(cfg) -> tuple[list[Job], list[str]]:
    """Every run `cfg.table` needs, each after the runs it needs, and the notes on the plan."""
    rows, sets, seeds = _chosen(cfg)
    left_out = [r for r in rows if _model_flags(cfg, r) is None]
    rows = [r for r in rows if r not in left_out]
    notes = _notes(cfg, rows, sets) + [f"{r.name} has no random-weights form: left out with "
                                       "--weights none" for r in left_out]
    jobs = [_stage_job(cfg, k, sets == ["phantom"]) for k in dict.fromkeys(r.init for r in rows
                                                                         if r.init)]
    for dataset in sets:
        here = [r for r in rows if dataset in r.datasets or dataset == "phantom"]
        if cfg.table == "echocare":
            jobs += _echocare_jobs(cfg, here, dataset, seeds) if here else []
            continue
        for row in here:
            jobs += _row_jobs(cfg, row, dataset, seeds, _model_flags(cfg, row),
                              {j.key for j in jobs})
    return jobs, notes


# ----------------------------------------------------------------------------- the docs' table
TABLE_NAMES = {"table2": "Table 2", "table3": "Table 3", "echocare": "EchoCare-CLIP"}


def _shown(job: Job) -> bool:
    """The jobs the docs show: each row on BUSI (EchoCare-CLIP's on its manifest), the
    contrastive stage, and LN-2's evaluation of one row."""
    return job.dataset in ("BUSI", "EchoCare") or job.key.startswith("ft/") or \
        (job.dataset == "LN-2" and job.row == "CLIP (Mona)" and job.script != "zeroshot.py")


def rows_markdown() -> str:
    """docs/reproducing.md's row table: every row's command as the plan writes it (seed 1;
    EchoCare-CLIP: 42), with --data-root data and --out runs/reproduce."""
    lines = ["| table | row | command |", "|---|---|---|"]
    seen = set()
    for table in TABLES:
        seeds = [42] if table == "echocare" else [1]
        for job in plan(ReproduceConfig(table=table, data_root="data", seeds=seeds))[0]:
            if _shown(job) and job.key not in seen:
                seen.add(job.key)
                name = "contrastive stage" if job.key.startswith("ft/") else TABLE_NAMES[table]
                lines.append(f"| {name} | {job.row} ({job.dataset}) | `{job.command()}` |")
    return "\n".join(lines) + "\n"
