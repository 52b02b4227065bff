"""Every command line of the project: dataclasses with their defaults, and argparse built from them.

Each field of a config dataclass becomes `--field-name`, typed by its default, with the field's
`help` metadata and its default on `--help` (a test checks every option of every command line).
Options that several scripts share are declared once, in small groups that the script configs
inherit (`--help` shows each group under its own title, from the last base class to the first):
- `RunOptions`, `ModelOptions`, `DataOptions`: every script;
- `PhantomOptions`, `FolderOptions`, `AdapterOptions`, `DecisionOptions`, `TrainOptions`,
  `ManifestOptions`: the scripts that have them.
Where a script needs another default, `default_of` redeclares the group's option with it (the
help text stays the group's). The scripts' configs:
- `SupervisedConfig`: train_seg.py, and `ClsConfig` (train_cls.py). The defaults are §4.2 of
  the ultrasound-CLIP paper (Qu et al., "Adapting Vision-Language Foundation Model for Next
  Generation Medical Ultrasound Image Analysis") as its official code (jinggqu/NextGen-UIA) runs
  it; where ours differed, the old behaviour stays behind a flag (docs/reproducing.md).
- `ZeroShotConfig`: zeroshot.py.
- `ContrastiveConfig`: train_contrastive.py (the ultrasound-CLIP paper's contrastive stage, and
  EchoCare-CLIP's, "Ultrasound Vision-Language Alignment via Contrastive Learning").
- `EvaluateConfig`: evaluate.py (EchoCare-CLIP's evaluation protocol).
The `python -m clip_us...` tools (captions, phantom, tables) declare their own dataclasses;
`parse_command` gives one dataclass per subcommand. The resolved config is saved as
`config.json` and inside every checkpoint and results file.

This module imports nothing of clip_us, so that every module, low or high, can build its command
line here.

Errors: a user's mistake (a missing folder, a bad file, a wrong flag combination) raises an
exception whose message says what to do. `report_errors` makes a script print that message alone
and exit with status 2 (`--debug` shows the traceback instead); `fail` does the same at once.
Ctrl-C prints one line instead of a traceback: what the run saved and the command that goes on
(`on_interrupt`), and exits with status 130.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import shlex
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


# ----------------------------------------------------------------------------- option types
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


def _default(f: dataclasses.Field):
    """A field's default (MISSING for a required option or a positional argument)."""
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def _option_type(f: dataclasses.Field, default):
    """A field's argparse type: metadata "type", else its default's (a list's elements', str for
    none), bounded below by metadata "min" or FLAG_MINIMUM, or a fraction with "fraction"."""
    if "type" in f.metadata:
        return f.metadata["type"]
    if f.metadata.get("fraction"):
        return _fraction
    sample = (default[0] if default else None) if isinstance(default, (list, tuple)) else default
    kind = str if sample is None or sample is dataclasses.MISSING else type(sample)
    low = f.metadata.get("min", FLAG_MINIMUM.get(f.name))
    return _at_least(kind, low) if low is not None and kind in (int, float) else kind


# ----------------------------------------------------------------------------- the parser
def _add_option(parser, f: dataclasses.Field):
    """--field-name from a field: bools as --x/--no-x; lists take several values, and with
    metadata "repeat" each use of the flag adds to them (--checkpoint a --checkpoint b). A field
    without a default is a required flag, or with metadata "positional" an argument."""
    default, helptext = _default(f), f.metadata.get("help", "")
    kind, choices = _option_type(f, default), f.metadata.get("choices")
    if f.metadata.get("positional"):
        return parser.add_argument(f.name, type=kind, choices=choices, help=helptext)
    flag = "--" + f.name.replace("_", "-")
    if default is dataclasses.MISSING:
        return parser.add_argument(flag, required=True, type=kind, choices=choices, help=helptext)
    if isinstance(default, bool):
        return parser.add_argument(flag, default=default, action=argparse.BooleanOptionalAction,
                                   help=helptext)
    if isinstance(default, (list, tuple)):
        return parser.add_argument(flag, default=list(default), nargs=f.metadata.get("nargs", "+"),
                                   type=kind, choices=choices, help=helptext,
                                   metavar=f.metadata.get("metavar"),
                                   action="extend" if f.metadata.get("repeat") else "store")
    return parser.add_argument(flag, default=default, type=kind, choices=choices, help=helptext)


def option_group(cls):
    """A dataclass of options that several configs share by inheriting it; --help lists them
    under the first line of its docstring."""
    cls = dataclass(cls)
    cls.group_title = cls.__doc__.splitlines()[0]
    return cls


def _group_title(cls, name: str):
    """The title of the option group that declares the field `name` of `cls` (None: its own)."""
    owner = next(base for base in reversed(cls.__mro__)
                 if name in base.__dict__.get("__annotations__", {}))
    return owner.__dict__.get("group_title")


def add_options(parser: argparse.ArgumentParser, cls) -> argparse.ArgumentParser:
    """The fields of `cls` as options of `parser`, those of an option group under its title."""
    groups = {}
    for f in dataclasses.fields(cls):
        if f.metadata.get("cli") is False:
            continue
        title = _group_title(cls, f.name)
        if title and title not in groups:
            groups[title] = parser.add_argument_group(title)
        _add_option(groups.get(title, parser), f)
    return parser


def build_parser(cls, description: str = "", epilog: str = "",
                 **parser_kw) -> argparse.ArgumentParser:
    """The parser of one config dataclass (`parser_kw`: prog, allow_abbrev, ...)."""
    parser = argparse.ArgumentParser(description=description, epilog=epilog,
                                     formatter_class=_HelpFormatter, **parser_kw)
    return add_options(parser, cls)


def parse_config(cls, argv=None, description: str = "", epilog: str = "", **parser_kw):
    """An instance of the config dataclass `cls` with the command line's overrides applied."""
    return cls(**vars(build_parser(cls, description, epilog, **parser_kw).parse_args(argv)))


def command_parser(commands: dict, description: str = "", **parser_kw) -> argparse.ArgumentParser:
    """A parser with one subcommand per dataclass of `commands` ({name: class}); a subcommand's
    help is its class's docstring (the first line in the list of subcommands)."""
    parser = argparse.ArgumentParser(description=description, formatter_class=_HelpFormatter,
                                     **parser_kw)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, cls in commands.items():
        doc = cls.__doc__.strip()
        add_options(sub.add_parser(name, help=doc.splitlines()[0], description=doc,
                                   formatter_class=_HelpFormatter,
                                   allow_abbrev=parser_kw.get("allow_abbrev", True)), cls)
    return parser


def parse_command(commands: dict, argv=None, description: str = "", **parser_kw):
    """An instance of the dataclass of the subcommand the command line names."""
    given = vars(command_parser(commands, description, **parser_kw).parse_args(argv))
    return commands[given.pop("command")](**given)


def given_fields(cls, argv=None) -> set:
    """The fields of `cls` that the command line sets (whatever their value)."""
    parser = build_parser(cls)
    for action in parser._actions:
        action.default = argparse.SUPPRESS  # only what the command line names stays
    known, _ = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    return set(vars(known))


def undocumented_options(parser: argparse.ArgumentParser) -> list[str]:
    """Options of `parser` (and of its subcommands) whose --help lacks a help text, or a default
    it neither shows nor explains: an empty default says what it means, "'' = ..." or
    "(default: ...)". A test keeps this empty for every command line of the project."""
    missing = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            missing += [f"{name} {option}" for name, sub in action.choices.items()
                        for option in undocumented_options(sub)]
        elif action.help != argparse.SUPPRESS and not isinstance(action, argparse._HelpAction):
            text = parser._get_formatter()._get_help_string(action)
            has_default = bool(action.option_strings) and not action.required
            if not action.help or has_default and "(default" not in text and "'' =" not in text:
                missing.append(action.option_strings[0] if action.option_strings else action.dest)
    return missing


# settings that change where a run writes or how fast it goes, never what it computes (a rerun
# may change them and still be the same run: clip_us.reproduce, the tables' seed joining)
NOT_A_SETTING = ("out_dir", "resume", "device", "workers", "debug")


# ----------------------------------------------------------------------------- errors
# Exceptions that carry a message for the user (what to fix), not a bug in clip_us.
USER_ERRORS = (ValueError, KeyError, FileNotFoundError, NotADirectoryError, PermissionError,
               FloatingPointError, RuntimeError, OSError)


def _message(err) -> str:
    # KeyError's str() is the repr of its argument; the message is the argument itself.
    return str(err.args[0]) if isinstance(err, KeyError) and err.args else str(err)


def fail(message, status: int = 2):
    """A usage or data error: `error: <message>` on stderr, no traceback, exit status `status`
    (2; 1 for a run that wrote its output but not all of it). `message` is a text or the
    exception that carries it."""
    print(f"error: {_message(message)}", file=sys.stderr)
    sys.exit(status)


def command_line(*more: str) -> str:
    """The command that started this process, as it was typed (sys.orig_argv), with `more`
    after it: what a message tells the user to run again."""
    return shlex.join([*sys.orig_argv, *more])


_interrupt_note = None  # what the Ctrl-C line says (on_interrupt); None: the command alone


def on_interrupt(note) -> None:
    """Ctrl-C prints `interrupted: <note()>`: what was saved and the command that goes on. The
    run folder sets it (runs.RunFolder), as soon as it knows where the run writes."""
    global _interrupt_note
    _interrupt_note = note


def _interrupted():
    note = _interrupt_note() if _interrupt_note else f"to run it again: {command_line()}"
    if sys.stderr.isatty():
        sys.stderr.write("\n")  # after the terminal's ^C and any progress bar
    print(f"interrupted: {note}", file=sys.stderr)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(130)  # the shell's status for Ctrl-C


def report_errors(debug: bool = False):
    """From here on, an uncaught user error prints `error: <message>` alone and exits with
    status 2 (other exceptions, bugs, keep their traceback), and Ctrl-C prints one line (what
    was saved, how to go on: on_interrupt) and exits with status 130. `debug=True` changes
    nothing: both show their traceback."""
    if debug:
        return

    def hook(kind, err, tb):
        if issubclass(kind, KeyboardInterrupt):
            _interrupted()
        if not issubclass(kind, USER_ERRORS):
            return sys.__excepthook__(kind, err, tb)
        print(f"error: {_message(err)}\n(--debug shows where it happened)", file=sys.stderr)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(2)  # an excepthook cannot choose the exit status otherwise
    sys.excepthook = hook


# ----------------------------------------------------------------------------- fields
def opt(default, help: str, **metadata):
    """A config field with its help text (and `choices=[...]`, `type=`, `min=` when given)."""
    if isinstance(default, (list, dict)):  # each instance gets its own copy
        return field(default_factory=lambda: type(default)(default),
                     metadata={"help": help, **metadata})
    return field(default=default, metadata={"help": help, **metadata})


def required(help: str, **metadata):
    """A field the command line must give: a required flag, or with `positional=True` an
    argument (in a `@dataclass(kw_only=True)`, or before the fields with defaults)."""
    return field(metadata={"help": help, **metadata})


def default_of(group, name: str, default, note: str = "", **metadata):
    """`group`'s option `name` with another default (and `metadata` on top), for a script whose
    recipe differs: its help text stays the group's, with `note` after it when given."""
    base = next(f for f in dataclasses.fields(group) if f.name == name)
    helptext = base.metadata["help"] + (f"; {note}" if note else "")
    return opt(default, **{**base.metadata, **metadata, "help": helptext})


# ----------------------------------------------------------------------------- option groups
@option_group
class RunOptions:
    """run (batches, processes, device, precision, output)"""
    batch_size: int = opt(32, "images per batch (per process under torchrun)")
    workers: int = opt(2, "DataLoader worker processes (0 = load in the main process)")
    device: str = opt("auto", "auto (CUDA when present), cpu, cuda or cuda:N")
    precision: str = opt("fp32", "inference (validation, test, embedding): fp32, or bf16 "
                         "(autocast on CUDA and on CPUs with native bf16; elsewhere fp32, with a "
                         "message)", choices=["fp32", "bf16"])
    out_dir: str = opt("", "run folder ('' = a new one in runs/<script>/, named by the data and "
                       "the time)")
    debug: bool = opt(False, "show the traceback of an error")


@option_group
class ModelOptions:
    """model (CLIP and its input)"""
    arch: str = opt("ViT-B/16", "CLIP architecture: ViT-B/16, ViT-B/32, ViT-L/14, or tiny "
                    "(12 blocks at width 64, for tests and demos)")
    weights: str = opt("ViT-B/16", "CLIP weights: a published name, a file or folder, or none "
                       "(random weights, announced)")
    image_size: int = opt(224, "model input side in pixels (images and masks are resized to it)")
    clip_norm: bool = opt(True, "normalise with CLIP's mean/std; --no-clip-norm feeds [0, 1] "
                          "pixels, as the official code does")


@option_group
class DataOptions:
    """data (bad files, split)"""
    skip_bad: bool = opt(False, "skip unreadable, missing or inconsistent images (counted) "
                         "instead of stopping at the first")
    split_file: str = opt("", "a split.json (train/val/test lists) to use as it is ('' = a new "
                          "seeded split, saved in the run folder)")


@option_group
class PhantomOptions:
    """phantom (the synthetic data set, no download)"""
    phantom_n: int = opt(200, "number of images")
    phantom_size: int = opt(256, "image side in pixels")


@option_group
class FolderOptions:
    """data set (layout and folder)"""
    dataset: str = opt("phantom", "data set layout: busi, tn3k, ddti, prostate, folder, nextgen "
                       "or phantom (synthetic, no download)")
    data_root: str = opt("", "the data set's folder ('' = none: only the phantom needs none)")
    nextgen_name: str = opt("", "<DS> of the NextGen-UIA layout, e.g. BUSI or LN-1 ('' = the "
                            "only one there)")
    crop: str = opt("auto", "crop to the imaging region: auto = every layout but nextgen and "
                    "prostate (their images come cropped)", choices=["auto", "yes", "no"])


MONA_VARIANTS = ["baseline", "noise_aware", "freq_enhanced", "hybrid"]  # mona.VARIANTS (tested)


@option_group
class AdapterOptions:
    """adapter (in CLIP's vision tower)"""
    adapter: str = opt("mona", "adapter in the vision tower; with --init, the file's adapter "
                       "(another one given is refused)", choices=["none", "lora", "mona"])
    init: str = opt("", "a checkpoint whose adapter (and fine-tuned backbone) the model starts "
                    "from: a train_contrastive.py best.pt (the ft. rows), an official NextGen-UIA "
                    "file, or a train_seg.py / train_cls.py checkpoint ('' = none)")
    mona_variant: str = opt("noise_aware", "--adapter mona: which of the official Mona variants "
                            "(baseline is the one the paper's text describes); with --init, the "
                            "file's unless given; the default is the official script's "
                            "--mona_variant, here src/models/clip/segmentation.py's (zero-shot: "
                            "zero_shot.py's)", choices=MONA_VARIANTS)


@option_group
class DecisionOptions:
    """decision (benign or malignant)"""
    threshold: float = opt(0.5, "P(malignant) above which an image is called malignant")


@option_group
class TrainOptions:
    """training (AdamW, cosine schedule, early stopping)"""
    epochs: int = opt(200, "maximum number of epochs, the cosine schedule's length (early "
                      "stopping usually ends a run first)")
    patience: int = opt(15, "stop after N validations without improvement")
    lr: float = opt(1e-4, "AdamW learning rate, where the cosine schedule starts")
    betas: list = opt([0.9, 0.95], "AdamW betas")
    weight_decay: float = opt(0.01, "AdamW weight decay")
    decay: str = opt("all", "which parameters decay: all trainable ones (official code) or "
                     "matrices (none on norms, biases, embeddings)", choices=["all", "matrices"])
    grad_clip: float = opt(0.0, "clip the gradient norm to this (0 = off)")
    amp: bool = opt(False, "training steps in bf16 autocast on CUDA: faster; off = fp32, as the "
                    "official code trains (no effect on the CPU)")
    resume: bool = opt(False, "continue a killed run from its last.pt in --out-dir")


@option_group
class ManifestOptions:
    """manifest (image-caption pairs) and random seed"""
    manifest: str = opt("", "image-caption manifest, CSV or JSONL ('' = the phantom's caption "
                        "manifest, written offline)")
    image_col: str = opt("", "the manifest's image column ('' = detected)")
    caption_col: str = opt("", "the manifest's caption column ('' = detected)")
    # manifest.NOT_WHITELISTED: the official fine-tuning code's whitelist, verbatim
    ascii_only: bool = opt(True, "delete the characters outside the official code's whitelist "
                           "(ASCII letters, digits, whitespace and punctuation but the percent "
                           "sign, plus … ± ° µ μ ≤ ≥ ≈ → – — •) before the 20-character rule, "
                           "as src/datasets/finetune.py does; --no-ascii-only keeps every "
                           "character")
    seed: int = opt(1, "random seed: the split, initialisation, batch order, bootstrap")


# ----------------------------------------------------------------------------- the scripts' configs
# The official code's argparse defaults per row of Tables 2 and 3 (NextGen-UIA commit 2e5fd63):
# --epochs 1000 in src/models/{clip,metaclip,unimedclip,dino,clipseg}/segmentation.py (and
# classification.py), 200 in src/models/{biomedclip,baselines}/*.py and scripts/*.sh; --batch_size
# 24 in src/models/dino/*.py, 32 elsewhere. --epochs 0 / --batch-size 0 (the defaults) mean these.
OFFICIAL_EPOCHS = {"clip": 1000, "metaclip": 1000, "unimedclip": 1000, "dinov2": 1000,
                   "clipseg": 1000, "biomedclip": 200, "unet": 200, "resnet18": 200}
OFFICIAL_BATCH = {"dinov2": 24}  # every other row: 32


def row_defaults(cfg):
    """A train_seg/train_cls config with --epochs 0 and --batch-size 0 (the defaults) replaced by
    the official values of its row (--backbone), as config.json then records them."""
    return dataclasses.replace(cfg, epochs=cfg.epochs or OFFICIAL_EPOCHS[cfg.backbone],
                               batch_size=cfg.batch_size or OFFICIAL_BATCH.get(cfg.backbone, 32))


@dataclass
class SupervisedConfig(RunOptions, TrainOptions, AdapterOptions, ModelOptions, DataOptions,
                       PhantomOptions, FolderOptions):
    """train_seg.py (and the base of ClsConfig): the ultrasound-CLIP paper's §4.2 as its
    official code runs it."""
    mask_threshold: float = opt(0.5, "a mask pixel is lesion when >= this fraction of the "
                                "mask's maximum (0: any value above 0)")
    keep_normal: bool = opt(False, "keep BUSI's normal images, as class 2")
    backbone: str = opt("clip", "the vision backbone (the row of the table; docs/backbones.md); "
                        "for all but clip, --weights ViT-B/16 = its own published file in the "
                        "clip_us cache", choices=["clip", "metaclip", "biomedclip", "unimedclip",
                                                  "dinov2", "resnet18", "unet", "clipseg"])
    adapter_train: str = opt("auto", "train the adapter: auto = the official code's rule (Mona "
                             "trains, LoRA stays at its initial or --init weights)",
                             choices=["auto", "yes", "no"])
    lora_shared_dropout: bool = opt(False, "--adapter lora: one dropout draw shared by q, k and v "
                                    "(faster; the official code draws one per target)")
    # The rows with heads of their own (--backbone unet | clipseg | dinov2, clip_us/baselines/).
    head: str = opt("official", "--backbone dinov2: the official code's DINOv2 heads, or the "
                    "feature-reducing heads", choices=["official", "proposed"])
    dinov2_official: bool = opt(False, "DINOv2 as the official code built it: no layer-scale, "
                                "its gammas ignored")
    clipseg_weights: str = opt("default", "CLIPSeg decoder: a Hugging Face "
                               "CIDAS/clipseg-rd64-refined folder, default (the cache's) or none "
                               "(random)")
    prompt: str = opt("", "CLIPSeg prompt: free text in place of --clipseg-prompts' text for "
                      "the data set ('' = that text)")
    clipseg_prompts: str = opt("official", "CLIPSeg prompts per data set: official "
                               "(NextGen-UIA's src/models/clipseg/prompt.py) or ours (the paper's "
                               "§4.3 wording)", choices=["official", "ours"])
    layers: list = opt([3, 6, 9], "vision blocks (0-based) the head reads")
    reduce_dim: int = opt(512, "feature reducer width")
    fuse: str = opt("sum", "how the reduced blocks are fused: sum (official code) or concat "
                    "(the paper's text)", choices=["sum", "concat"])
    seeds: list = opt([1, 2, 3], "one run per seed; the table reports their mean")
    eval_every: int = opt(10, "validate every N epochs (and after the last)")
    eval_at: str = opt("official", "official: validate after epochs N+1, 2N+1, ... as the "
                       "official scripts' `epoch > 0 and epoch %% N == 0` on 0-based epochs "
                       "(src/models/clip/segmentation.py); every: after epochs N, 2N, ...",
                       choices=["official", "every"])
    eval_only: bool = opt(False, "evaluate --checkpoint on the whole data set (e.g. LN-2) "
                          "without training; the model, and the phantom unless given, come from "
                          "the checkpoint")
    checkpoint: str = opt("", "the seed<N>/best.pt that --eval-only evaluates ('' = none)")
    n_figures: int = opt(8, "test cases drawn in the overlay figure")
    # the official scripts' per-row recipe (OFFICIAL_EPOCHS, OFFICIAL_BATCH above)
    epochs: int = default_of(TrainOptions, "epochs", 0, min=0,
                             note="0 = the row's official default: 1000 for clip, metaclip, "
                             "unimedclip, dinov2, clipseg (src/models/<row>/*.py), 200 for "
                             "biomedclip, unet, resnet18 (their argparse, scripts/*.sh)")
    batch_size: int = default_of(RunOptions, "batch_size", 0, min=0,
                                 note="0 = the row's official default: 24 for dinov2 "
                                 "(src/models/dino/*.py), 32 for the others")


@dataclass
class ClsConfig(DecisionOptions, SupervisedConfig):
    """train_cls.py: the supervised options plus the classification head and loss."""
    cls_head: str = opt("auto", "auto (the backbone's official head: mlp for clip, linear for "
                        "metaclip/biomedclip/unimedclip), mlp (official code), pool (the paper's "
                        "text) or linear (avg pool, Dropout(0.5), Linear)",
                        choices=["auto", "mlp", "pool", "linear"])
    focal: str = opt("sigmoid", "MONAI FocalLoss variant: sigmoid (its default) or softmax",
                     choices=["sigmoid", "softmax"])
    mona_variant: str = opt("freq_enhanced", "--adapter mona: which of the official Mona "
                            "variants (baseline is the one the paper's text describes); with "
                            "--init, the file's unless given; the default is the official "
                            "script's --mona_variant, here src/models/clip/classification.py's",
                            choices=MONA_VARIANTS)


@dataclass
class ZeroShotConfig(RunOptions, DecisionOptions, AdapterOptions, ModelOptions, DataOptions,
                     PhantomOptions, FolderOptions):
    """zeroshot.py: CLIP with prompts, no training."""
    adapter: str = default_of(AdapterOptions, "adapter", "none")
    split: str = opt("all", "images scored: all (every image, as the official evaluation) or "
                     "test (the test part of --split-file or of a new 8:1:1 split)",
                     choices=["all", "test"])
    prompts: str = opt("auto", "auto (official for LN and BUSI, else echocare), official (the "
                       "official zero-shot script's ten prompts per class, "
                       "src/models/zero_shot_prompt.py), paper (its §4.3 prompt), echocare, "
                       "ensemble (our own ten templates), or a JSON file {class: [prompts]}")
    prompt_set: str = opt("", "whose prompts: busi, ln1, tn3k, ... ('' = --nextgen-name or "
                          "--dataset)")
    organ: str = opt("", "organ named in the echocare/ensemble prompts ('' = the data set's)")


@option_group
class EchoCareOptions:
    """--model echocare only (EchoCare-CLIP's dual encoder)"""
    text_encoder: str = opt("clip", "CLIP ViT-B/32's text tower or BioClinicalBERT",
                            choices=["clip", "bert"])
    image_weights: str = opt("", "the EchoCare Swin checkpoint ('' = the cache's)")
    text_weights: str = opt("", "text weights ('' = ViT-B/32, or the cached Bio_ClinicalBERT "
                            "folder)")
    norm_stats: str = opt("authors", "the authors' mean/std, or this run's training split's",
                          choices=["authors", "train"])
    grad_checkpointing: bool = opt(False, "recompute activations in backward (less memory)")
    augment: bool = opt(True, "the authors' random crop and flip in training; --no-augment "
                        "trains on the evaluation transform")


@dataclass
class ContrastiveConfig(RunOptions, EchoCareOptions, TrainOptions, ModelOptions, DataOptions,
                        PhantomOptions, ManifestOptions):
    """train_contrastive.py: the ultrasound-CLIP paper's contrastive stage as its official code
    runs it, plus EchoCare-CLIP's modes."""
    model: str = opt("clip", "clip (the ultrasound-CLIP paper) or echocare (EchoCare-CLIP's "
                     "dual encoder; its authors' recipe becomes the default of every flag not "
                     "given)", choices=["clip", "echocare"])
    # contrastive.TRAIN_MODES (a test keeps them equal: this module imports nothing of clip_us)
    train: str = opt("adapter", "adapter: only the adapter; heads: visual.proj, "
                     "text_projection, logit_scale; image / text: + that tower; full: everything",
                     choices=["adapter", "heads", "image", "text", "full"])
    adapter: str = default_of(AdapterOptions, "adapter", "",
                              note="'' = mona with --train adapter, none otherwise",
                              choices=["", "none", "lora", "mona"])
    temperature: float = opt(0.0, "0 = fixed 0.07 with --train adapter, learnable (from CLIP's "
                             "logit_scale) otherwise; T > 0 fixes it at T")
    split: str = opt("90,10", "without a split column: train,val (seeded shuffle, the official "
                     "code) or train,val,test (stratified by data set, EchoCare-CLIP)")
    split_seed: int = opt(-1, "seed of the split (-1 = --seed)")
    hold_out: str = opt("", "data sets kept out of training, comma-separated, matched "
                        "case-insensitively ('' = none; --model echocare: the authors' "
                        "Dataset_BUSI_with_GT,Liver_ultrasound, those the manifest has)")
    stable_ties: bool = opt(False, "validation's strict_* retrieval ranks with a stable sort "
                            "(ties in column order) instead of the authors' np.argsort(-sim, "
                            "axis=1) on float32")
    min_lr: float = opt(1e-8, "the learning rate where the cosine schedule ends")
    schedule: str = opt("iter", "cosine stepped per iteration (the ultrasound-CLIP paper) or per "
                        "epoch (EchoCare-CLIP)", choices=["iter", "epoch"])
    max_skips: int = opt(5, "non-finite batches in a row that stop the run (single ones are "
                         "skipped, counted)")
    # the official fine-tuning code's recipe where it differs from the supervised scripts'
    mona_variant: str = opt("noise_aware", "--adapter mona: which of the official Mona variants "
                            "(baseline is the one the paper's text describes); the default is "
                            "src/models/clip/finetune.py's --mona_variant", choices=MONA_VARIANTS)
    batch_size: int = default_of(RunOptions, "batch_size", 32, note="32 is the paper's; the "
                                 "official src/models/clip/finetune.py's is 64")
    phantom_n: int = default_of(PhantomOptions, "phantom_n", 400)
    # several: merged as src/datasets/finetune.py merges MedPix and PMC-CURD (merge_manifests)
    manifest: list = opt([], "image-caption manifest, CSV or JSONL (default: the phantom's "
                         "caption manifest, written offline); repeatable: --manifest MEDPIX "
                         "--manifest PMC_CURD concatenates them in that order, cleaned alike and "
                         "split as one set, as the official code", repeat=True)
    epochs: int = default_of(TrainOptions, "epochs", 1000)
    patience: int = default_of(TrainOptions, "patience", 10)
    grad_clip: float = default_of(TrainOptions, "grad_clip", 1.0)


@dataclass
class EvaluateConfig(RunOptions, ModelOptions, DataOptions, ManifestOptions):
    """evaluate.py: EchoCare-CLIP's evaluation protocol, one table row per model."""
    organ: str = opt("", "organ of the rows without an organ column value ('' = none: every "
                     "labelled row needs one then)")
    classes: list = opt([], "restrict to these labels (default: every label present, e.g. 3 "
                        "classes for BUSI with normal; train_cls.py/zeroshot.py default to "
                        "benign/malignant)")
    checkpoint: list = opt([], "a train_contrastive.py or EchoCare-CLIP checkpoint to evaluate "
                           "(default: none; repeatable)", repeat=True)
    weights: list = opt([], "vanilla model to evaluate: a CLIP name, file or none, or "
                        "BiomedCLIP (biomedclip = the cache's folder, or a folder with "
                        "open_clip_config.json) (default: --arch's published weights when no "
                        "--checkpoint is given; repeatable)", repeat=True)
    image_size: int = default_of(ModelOptions, "image_size", 224,
                                 note="--weights models only: a checkpoint uses its own")
    clip_norm: bool = default_of(ModelOptions, "clip_norm", True,
                                 note="--weights models only: a checkpoint uses its own")
    name: list = opt([], "row names, checkpoints first, then weights (default: each model's "
                     "own; repeatable)", repeat=True)
    allow_overlap: bool = opt(False, "evaluate even on images a model trained on")
    split: str = opt("test", "images scored: test (the split's test part) or all (every image: "
                     "alignment, retrieval and zero-shot only, as the authors scored their liver "
                     "set; the probes and few-shot stages need a split and are skipped)",
                     choices=["test", "all"])
    prompt_organ: str = opt("", "zero-shot: the organ every prompt names ('' = each image's own; "
                            "breast = the authors' in-distribution prompt, which says breast for "
                            "every organ)")
    stable_ties: bool = opt(False, "strict_* retrieval ranks with a stable sort (ties in column "
                            "order) instead of the authors' np.argsort(-sim, axis=1) on float32")
    probe_fractions: list = opt([0.01, 0.05, 0.10], "few-shot probe: fractions of each class's "
                                "training images", fraction=True)
    probe_seeds: list = opt([42, 43, 44, 45, 46], "few-shot probe: one subset per seed (the "
                            "authors' five)")
    fit: str = opt("organ", "linear probe, few-shot probe and end-to-end: organ = one fit per "
                   "organ (organs in train, val and test; classes with >= 2 training rows), "
                   "reported per organ and as the macro and test-count-weighted means across "
                   "organs (the authors'); pooled = one fit on all organs (ours)",
                   choices=["organ", "pooled"])
    e2e: str = opt("whole", "end-to-end few-shot: whole = a copy of the whole model trains (both "
                   "encoders, heads, temperature; the authors'). Cost: a run per fraction, seed and "
                   "organ trains on that fraction of the training images (n_frac, at least 1 per "
                   "class): ceil(n_frac/16) steps x 4 epochs, a validation pass each epoch and one "
                   "test pass. One training step of batch 16, fp32: ViT-B/16 at 224 measured "
                   "40.9 s on a 2-core AVX2 CPU (AMD EPYC); on BUSI's split (545 training "
                   "images) 1/5/10 %% are 8/29/56 images = 1/2/4 steps an epoch, 2.7/5.5/11 min of "
                   "training per run, plus the passes over 118 validation images x 4 and 117 test "
                   "images (not measured). EchoCare Swin + CLIP text at 256: 154 s per 16 images "
                   "on the same CPU (measured at batch 4 and scaled: batch 16 ran out of memory "
                   "in 23 GB), so 10/21/41 min of training per run. On one H100-class GPU about "
                   "0.2 s / step (Swin) and 0.1 s (ViT-B/16): estimates, not measured. "
                   "bench/bench_e2e.py, BENCHMARKS.md. heads = only the heads and temperature on "
                   "cached features (ours, far cheaper)",
                   choices=["whole", "heads"])
    e2e_fractions: list = opt([0.01, 0.05, 0.10], "end-to-end few-shot: fractions of each "
                              "class's training images (the authors' published settings)",
                              fraction=True)
    e2e_seeds: list = opt([42], "end-to-end few-shot: one subset and batch order per seed "
                          "(the authors': 42)")
    e2e_epochs: int = opt(4, "end-to-end few-shot epochs (the authors': 4)", min=1)
    e2e_batch_size: int = opt(16, "end-to-end few-shot batch", min=1)
    e2e_lr: float = opt(0.0, "0 = 1e-5 for trained models, 5e-6 for vanilla", min=0)
    bootstrap: int = opt(1000, "resamples (0 = no CIs)", min=0)
    seed: int = default_of(ManifestOptions, "seed", 42)
    ascii_only: bool = default_of(ManifestOptions, "ascii_only", False,
                                  note="off here: EchoCare-CLIP's evaluation keeps every character")
    out_dir: str = default_of(RunOptions, "out_dir", "", note="given again, it keeps its "
                              "split.json and its cached features")


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
