"""Script configuration: dataclasses with their defaults, and the command line generated from them.

Each field of a config dataclass becomes `--field-name`, typed by its default, with the field's
`help` metadata and its default on `--help` (a test checks that every option has help).
- `SupervisedConfig`: train_seg.py (and the base of `ClsConfig`, train_cls.py). The defaults are
  seed 003 §4.2 as its official code (jinggqu/NextGen-UIA) runs it; where ours differed, the old
  behaviour stays behind a flag (docs/reproducing.md lists them).
- `ZeroShotConfig`: zeroshot.py.
The resolved config is saved as `config.json` and inside every checkpoint and results file.

Errors: a user's mistake (a missing folder, a bad file, a wrong flag combination) raises an
exception whose message says what to do. `report_errors` makes a script print that message alone
and exit with status 2; `--debug` shows the traceback instead.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from dataclasses import dataclass, field


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Each option's default after its help; the description and epilog keep their line breaks.
    An empty default ('' or none) is not shown, nor one the help text already states."""

    def _get_help_string(self, action):
        text = action.help or ""
        if action.default in ("", None, []) or "(default" in text:
            return text
        return super()._get_help_string(action)


# Counts and sizes that cannot work below these values: refused when the command line is parsed.
FLAG_MINIMUM = {"epochs": 1, "batch_size": 1, "image_size": 16, "eval_every": 1, "patience": 1,
                "workers": 0, "phantom_n": 1, "phantom_size": 16, "n_figures": 0}


def _at_least(kind, low):
    """An argparse type for `kind` that refuses values below `low` (argparse then exits 2)."""
    def parse(text):
        value = kind(text)
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {text}")
        return value
    parse.__name__ = kind.__name__   # argparse names the type in its messages
    return parse


def _fraction(text: str) -> float:
    """An argparse type: a fraction in (0, 1] (0.05 = 5 %)."""
    value = float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"a fraction in (0, 1] (0.05 = 5 %), got {text}")
    return value


def _option_type(f: dataclasses.Field, default):
    """A field's argparse type: its default's (a list's elements'), bounded below by its
    metadata "min" or FLAG_MINIMUM, or a fraction with metadata "fraction"."""
    many = isinstance(default, (list, tuple))
    kind = (type(default[0]) if default else str) if many else \
        (type(default) if default is not None else str)
    if f.metadata.get("fraction"):
        return _fraction
    low = f.metadata.get("min", FLAG_MINIMUM.get(f.name))
    return _at_least(kind, low) if low is not None and kind in (int, float) else kind


def _add_option(parser: argparse.ArgumentParser, f: dataclasses.Field):
    """--field-name from a field: bools as --x/--no-x; lists take several values, and with
    metadata "repeat" each use of the flag adds to them (--checkpoint a --checkpoint b)."""
    default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
    flag = "--" + f.name.replace("_", "-")
    helptext = f.metadata.get("help", "")
    if isinstance(default, bool):
        parser.add_argument(flag, default=default, action=argparse.BooleanOptionalAction,
                            help=helptext)
    elif isinstance(default, (list, tuple)):
        parser.add_argument(flag, default=list(default), nargs="+",
                            type=_option_type(f, default), help=helptext,
                            action="extend" if f.metadata.get("repeat") else "store")
    else:
        parser.add_argument(flag, default=default, type=_option_type(f, default),
                            choices=f.metadata.get("choices"), help=helptext)


def build_parser(cls, description: str = "", epilog: str = "") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description, epilog=epilog,
                                     formatter_class=_HelpFormatter)
    for f in dataclasses.fields(cls):
        if f.metadata.get("cli") is not False:
            _add_option(parser, f)
    return parser


def parse_config(cls, argv=None, description: str = "", epilog: str = ""):
    """An instance of the config dataclass `cls` with the command line's overrides applied."""
    return cls(**vars(build_parser(cls, description, epilog).parse_args(argv)))


def given_fields(cls, argv=None) -> set:
    """The fields of `cls` that the command line sets (whatever their value)."""
    parser = build_parser(cls)
    for action in parser._actions:
        action.default = argparse.SUPPRESS  # only what the command line names stays
    known, _ = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    return set(vars(known))


def missing_help(cls) -> list[str]:
    """Options of `cls` without a help text (a test keeps this empty)."""
    return [f.name for f in dataclasses.fields(cls)
            if f.metadata.get("cli") is not False and not f.metadata.get("help")]


# ----------------------------------------------------------------------------- errors
# Exceptions that carry a message for the user (what to fix), not a bug in clip_us.
USER_ERRORS = (ValueError, KeyError, FileNotFoundError, NotADirectoryError, PermissionError,
               FloatingPointError, RuntimeError, OSError)


def fail(message: str):
    """A usage or data error: the message, no traceback, exit status 2."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def _message(err: BaseException) -> str:
    # KeyError's str() is the repr of its argument; the message is the argument itself.
    return str(err.args[0]) if isinstance(err, KeyError) and err.args else str(err)


def report_errors(debug: bool = False):
    """From here on, an uncaught user error prints `error: <message>` alone and exits with
    status 2 (other exceptions, bugs, keep their traceback). `debug=True` changes nothing."""
    if debug:
        return

    def hook(kind, err, tb):
        if not issubclass(kind, USER_ERRORS):
            return sys.__excepthook__(kind, err, tb)
        print(f"error: {_message(err)}\n(--debug shows where it happened)", file=sys.stderr)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(2)  # an excepthook cannot choose the exit status otherwise
    sys.excepthook = hook


# ----------------------------------------------------------------------------- the scripts' configs
def opt(default, help: str, **metadata):
    """A config field with its help text (and `choices=[...]` when given)."""
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help, **metadata})
    return field(default=default, metadata={"help": help, **metadata})


@dataclass
class SupervisedConfig:
    """train_seg.py (and the base of ClsConfig): seed 003 §4.2 as its official code runs it."""
    # data
    dataset: str = opt("phantom", "data set layout: busi, tn3k, ddti, prostate, folder, nextgen "
                       "or phantom (synthetic, no download)")
    data_root: str = opt("", "the data set's folder (needed for every layout but phantom)")
    nextgen_name: str = opt("", "<DS> of the NextGen-UIA layout, e.g. BUSI or LN-1 ('' = the "
                            "only one there)")
    split_file: str = opt("", "a split JSON (train/val/test lists) to use as it is ('' = a "
                          "seeded 8:1:1 split, saved as split.json in the run folder)")
    crop: str = opt("auto", "crop to the imaging region: auto = every layout but nextgen and "
                    "prostate (their images come cropped)", choices=["auto", "yes", "no"])
    mask_threshold: float = opt(0.5, "a mask pixel is lesion when >= this fraction of the "
                                "mask's maximum (0: any value above 0)")
    phantom_n: int = opt(200, "phantom: number of images (--eval-only: the checkpoint's "
                         "unless given)")
    phantom_size: int = opt(256, "phantom: image side in pixels (--eval-only: the "
                            "checkpoint's unless given)")
    keep_normal: bool = opt(False, "keep BUSI's normal images, as class 2")
    image_size: int = opt(224, "model input side in pixels (images and masks are resized to it)")
    clip_norm: bool = opt(True, "normalise with CLIP's mean/std; --no-clip-norm feeds [0, 1] "
                          "pixels, as the official code does")
    skip_bad: bool = opt(False, "skip unreadable or inconsistent files (counted) instead of "
                         "stopping at the first")
    workers: int = opt(2, "DataLoader worker processes")
    # model
    arch: str = opt("ViT-B/16", "CLIP architecture: ViT-B/16, ViT-B/32, ViT-L/14, or tiny "
                    "(12 blocks at width 64, for tests and demos)")
    backbone: str = opt("clip", "the vision backbone (the row of the table; docs/backbones.md)",
                        choices=["clip", "metaclip", "biomedclip", "unimedclip", "dinov2",
                                 "resnet18", "unet", "clipseg"])
    weights: str = opt("ViT-B/16", "backbone weights: for clip a published name; a file or "
                       "folder; none (random weights, announced). Other backbones: ViT-B/16 = "
                       "their own published file in the clip_us cache")
    adapter: str = opt("mona", "adapter in the vision tower", choices=["none", "lora", "mona"])
    adapter_train: str = opt("auto", "train the adapter: auto = the official code's rule (Mona "
                             "trains, LoRA stays at its initial or --init weights)",
                             choices=["auto", "yes", "no"])
    init: str = opt("", "checkpoint whose adapter (and fine-tuned backbone) to start from: the "
                    "ft. rows (train_contrastive.py's best.pt)")
    lora_shared_dropout: bool = opt(False, "--adapter lora: one dropout draw shared by q, k and v "
                                    "(faster; the official code draws one per target)")
    # The rows with heads of their own (--backbone unet | clipseg | dinov2, clip_us/rowmodels.py).
    head: str = field(default="official", metadata={
        "choices": ["official", "proposed"],
        "help": "--backbone dinov2: the official code's DINOv2 heads, or the feature-reducing heads"})
    dinov2_official: bool = field(default=False, metadata={
        "help": "DINOv2 as the official code built it: no layer-scale, its gammas ignored"})
    clipseg_weights: str = field(default="default", metadata={
        "help": "CLIPSeg decoder: a Hugging Face CIDAS/clipseg-rd64-refined folder, default (the "
                "cache's) or none (random)"})
    prompt: str = field(default="", metadata={
        "help": "CLIPSeg prompt ('' = the data set's benign/malignant description)"})
    layers: list = opt([3, 6, 9], "vision blocks (0-based) the head reads")
    reduce_dim: int = opt(512, "feature reducer width")
    fuse: str = opt("sum", "how the reduced blocks are fused: sum (official code) or concat "
                    "(the paper's text)", choices=["sum", "concat"])
    # training
    seeds: list = opt([1, 2, 3], "one run per seed; the table reports their mean")
    epochs: int = opt(200, "maximum number of epochs")
    eval_every: int = opt(10, "validate every N epochs (and after the last)")
    patience: int = opt(15, "stop after N validations without improvement")
    batch_size: int = opt(32, "images per batch (per process under torchrun)")
    lr: float = opt(1e-4, "AdamW learning rate (cosine schedule per step down to 1e-8)")
    betas: list = opt([0.9, 0.95], "AdamW betas")
    weight_decay: float = opt(0.01, "AdamW weight decay")
    decay: str = opt("all", "which parameters decay: all trainable ones (official code) or "
                     "matrices (none on norms, biases, embeddings)", choices=["all", "matrices"])
    grad_clip: float = opt(0.0, "clip the gradient norm to this (0 = off, as the official code)")
    amp: bool = opt(True, "training steps: bf16 autocast on CUDA (no effect on the CPU)")
    precision: str = opt("fp32", "validation and test passes: fp32, or bf16 (autocast on CUDA "
                         "and on CPUs with native bf16; elsewhere fp32, with a message)",
                         choices=["fp32", "bf16"])
    device: str = opt("auto", "auto (CUDA when present), cpu, cuda or cuda:N")
    # output
    out_dir: str = opt("", "run folder ('' = runs/<script>/<dataset>-<row>-<time>)")
    resume: bool = opt(False, "continue a killed run from <out-dir>/seed<N>/last.pt")
    eval_only: bool = opt(False, "evaluate --checkpoint on the whole data set (e.g. LN-2) "
                          "without training")
    checkpoint: str = opt("", "with --eval-only: a seed<N>/best.pt")
    n_figures: int = opt(8, "test cases drawn in the overlay figure")
    debug: bool = opt(False, "show the traceback of an error")


@dataclass
class ClsConfig(SupervisedConfig):
    """train_cls.py: the supervised options plus the classification head and loss."""
    cls_head: str = opt("auto", "auto (the backbone's official head: mlp for clip, linear for "
                        "metaclip/biomedclip/unimedclip), mlp (official code), pool (the paper's "
                        "text) or linear (avg pool, Dropout(0.5), Linear)",
                        choices=["auto", "mlp", "pool", "linear"])
    focal: str = opt("sigmoid", "MONAI FocalLoss variant: sigmoid (its default) or softmax",
                     choices=["sigmoid", "softmax"])
    threshold: float = opt(0.5, "P(malignant) above which an image is called malignant")


@dataclass
class ZeroShotConfig:
    """zeroshot.py: CLIP with prompts, no training."""
    dataset: str = opt("phantom", "data set layout: busi, tn3k, ddti, prostate, folder, nextgen "
                       "or phantom (synthetic, no download)")
    data_root: str = opt("", "the data set's folder (needed for every layout but phantom)")
    nextgen_name: str = opt("", "<DS> of the NextGen-UIA layout; also picks the LN prompt")
    split: str = opt("all", "images scored: all (every image, as the official evaluation) or "
                     "test (the 8:1:1 split's test part)", choices=["all", "test"])
    split_file: str = opt("", "with --split test: a split JSON to use as it is")
    crop: str = opt("auto", "crop to the imaging region: auto = every layout but nextgen and "
                    "prostate", choices=["auto", "yes", "no"])
    phantom_n: int = opt(200, "phantom: number of images")
    phantom_size: int = opt(256, "phantom: image side in pixels")
    image_size: int = opt(224, "model input side in pixels")
    clip_norm: bool = opt(True, "normalise with CLIP's mean/std; --no-clip-norm feeds [0, 1] "
                          "pixels")
    skip_bad: bool = opt(False, "skip unreadable files (counted) instead of stopping")
    workers: int = opt(2, "DataLoader worker processes")
    arch: str = opt("ViT-B/16", "CLIP architecture (tiny: tests and demos)")
    weights: str = opt("ViT-B/16", "CLIP weights: a published name, a file or folder, or none")
    adapter: str = opt("none", "adapter in the vision tower", choices=["none", "lora", "mona"])
    init: str = opt("", "checkpoint with the adapter (and fine-tuned backbone) weights: the ft. "
                    "rows")
    prompts: str = opt("auto", "auto (the paper's where it has one, else echocare), paper, "
                       "echocare, ensemble, or a JSON file {class: [prompts]}")
    prompt_set: str = opt("", "whose prompts: busi, ln1, tn3k, ... (default: --nextgen-name "
                          "or --dataset)")
    organ: str = opt("", "organ named in the echocare/ensemble prompts ('' = the data set's)")
    precision: str = opt("fp32", "fp32, or bf16 (autocast on CUDA and on CPUs with native bf16; "
                         "elsewhere fp32, with a message)", choices=["fp32", "bf16"])
    batch_size: int = opt(32, "images per batch")
    threshold: float = opt(0.5, "P(malignant) above which an image is called malignant")
    device: str = opt("auto", "auto (CUDA when present), cpu, cuda or cuda:N")
    out_dir: str = opt("", "run folder ('' = runs/zeroshot/<dataset>-<row>-<time>)")
    debug: bool = opt(False, "show the traceback of an error")


# ----------------------------------------------------------------------------- --eval-only
# What --eval-only takes from the command line; everything else comes from the checkpoint.
EVAL_ONLY_FROM_CLI = ("dataset", "data_root", "nextgen_name", "split_file", "crop",
                      "mask_threshold", "out_dir", "eval_only", "checkpoint", "device", "workers",
                      "skip_bad", "batch_size", "precision", "n_figures", "debug")
# ... and these only when given (else the checkpoint's: its phantom is the one it was tested on).
EVAL_ONLY_IF_GIVEN = ("phantom_n", "phantom_size")


def init_for_eval(init: str, ckpt: dict) -> str:
    """The --init a checkpoint was trained on top of, when evaluating it needs that file again.
    A task checkpoint holds its adapters and head, but not a vision tower that --init fine-tuned
    (train_contrastive.py --train image|full) and the task run kept frozen: dropping the file
    would silently evaluate OpenAI's tower instead."""
    if not init or "model_state_dict" in ckpt:
        return ""
    if os.path.exists(init):
        return init
    print(f"warning: this checkpoint was trained on top of --init {init}, which is gone; if that "
          f"file held a fine-tuned vision tower, this evaluation uses the original weights")
    return ""


def _as_flag(name: str, value) -> str:
    """How a setting is written on the command line: --amp / --no-amp, --lr 0.001."""
    flag = name.replace("_", "-")
    return f"--{'' if value else 'no-'}{flag}" if isinstance(value, bool) else f"--{flag} {value}"


def eval_only_config(cfg, ckpt: dict, given: set = frozenset()):
    """For --eval-only: the checkpoint's config decides the model, the CLI decides the data.
    The seed is the checkpoint's own; its --init file is not needed again (the checkpoint holds
    the adapter weights)."""
    cls = type(cfg)
    names = {f.name for f in dataclasses.fields(cls)}
    saved = cls(**{k: v for k, v in ckpt["config"].items() if k in names})
    keep = {k: getattr(cfg, k) for k in EVAL_ONLY_FROM_CLI}
    keep.update({k: getattr(cfg, k) for k in EVAL_ONLY_IF_GIVEN if k in given})
    for k in sorted(set(given) - set(keep)):
        if getattr(cfg, k) != getattr(saved, k):  # said, not silently dropped
            print(f"warning: {_as_flag(k, getattr(cfg, k))} is not used: --eval-only takes "
                  f"{k} from the checkpoint ({getattr(saved, k)})")
    seed = ckpt.get("seed", ckpt["config"].get("seed_now", saved.seeds[0]))  # older files: seed_now
    keep.update(init=init_for_eval(saved.init, ckpt), seeds=[seed])
    return dataclasses.replace(saved, **keep)
