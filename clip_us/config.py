"""Script configuration: dataclasses with their defaults, and the command line generated from them.

Each field of a config dataclass becomes `--field-name`, typed by its default, with the field's
`help` metadata (and its default) on `--help`. `SupervisedConfig` holds the defaults shared by
train_seg.py and train_cls.py: seed 003 §4.2 as its official code (jinggqu/NextGen-UIA) runs it.
The resolved config is saved as `config.json` and inside every checkpoint and results file.
"""
from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field


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


def _add_option(parser: argparse.ArgumentParser, f: dataclasses.Field):
    default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
    flag = "--" + f.name.replace("_", "-")
    helptext = f.metadata.get("help", "")
    if isinstance(default, bool):
        parser.add_argument(flag, default=default, action=argparse.BooleanOptionalAction,
                            help=helptext)
    elif isinstance(default, (list, tuple)):
        kind = type(default[0]) if default else str
        parser.add_argument(flag, default=list(default), nargs="+", type=kind, help=helptext)
    else:
        kind = type(default) if default is not None else str
        if f.name in FLAG_MINIMUM and kind in (int, float):
            kind = _at_least(kind, FLAG_MINIMUM[f.name])
        parser.add_argument(flag, default=default, type=kind, choices=f.metadata.get("choices"),
                            help=helptext)


def build_parser(cls, description: str = "", epilog: str = "") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description, epilog=epilog)
    for f in dataclasses.fields(cls):
        if f.metadata.get("cli") is not False:
            _add_option(parser, f)
    return parser


def parse_config(cls, argv=None, description: str = "", epilog: str = ""):
    """An instance of the config dataclass `cls` with the command line's overrides applied."""
    return cls(**vars(build_parser(cls, description, epilog).parse_args(argv)))


@dataclass
class SupervisedConfig:
    """Defaults shared by train_seg.py and train_cls.py: seed 003 §4.2 and its official code."""
    dataset: str = field(default="phantom", metadata={"help": "busi, tn3k, ddti, prostate, "
                                                      "folder, nextgen, phantom"})
    data_root: str = field(default="", metadata={"help": "dataset folder ('' = default)"})
    nextgen_name: str = field(default="", metadata={"help": "<DS> for the nextgen layout"})
    phantom_n: int = field(default=200, metadata={"help": "phantom: number of images"})
    phantom_size: int = field(default=256, metadata={"help": "phantom: image side in pixels"})
    keep_normal: bool = field(default=False, metadata={"help": "BUSI normal images as class 2"})
    image_size: int = 224
    clip_norm: bool = field(default=True, metadata={"help": "CLIP mean/std; --no-clip-norm "
                                                    "feeds [0,1] pixels as the official code"})
    skip_bad: bool = False
    workers: int = 2
    arch: str = field(default="ViT-B/16", metadata={"help": "ViT-B/16, tiny, ..."})
    backbone: str = "clip"
    weights: str = field(default="ViT-B/16", metadata={"help": "name, path, or none"})
    adapter: str = field(default="mona", metadata={"choices": ["none", "lora", "mona"]})
    adapter_train: str = field(default="yes", metadata={"choices": ["yes", "no"]})
    init: str = field(default="", metadata={"help": "checkpoint with adapter weights (ft. rows)"})
    layers: list = field(default_factory=lambda: [3, 6, 9])
    reduce_dim: int = 512
    fuse: str = field(default="sum", metadata={"choices": ["sum", "concat"]})
    seeds: list = field(default_factory=lambda: [1, 2, 3])
    epochs: int = 200
    eval_every: int = 10
    patience: int = 15
    batch_size: int = 32
    lr: float = 1e-4
    betas: list = field(default_factory=lambda: [0.9, 0.95])
    weight_decay: float = 0.01
    decay: str = field(default="matrices", metadata={"choices": ["all", "matrices"]})
    grad_clip: float = 1.0
    amp: bool = field(default=True, metadata={"help": "bf16 autocast on CUDA (no-op on CPU)"})
    device: str = "auto"
    out_dir: str = ""
    resume: bool = False
    eval_only: bool = False
    checkpoint: str = field(default="", metadata={"help": "with --eval-only"})
    n_figures: int = 8


# What --eval-only takes from the command line; everything else comes from the checkpoint.
EVAL_ONLY_FROM_CLI = ("dataset", "data_root", "nextgen_name", "out_dir", "eval_only", "checkpoint",
                      "device", "workers", "skip_bad", "batch_size", "amp", "n_figures",
                      "phantom_n", "phantom_size")


def eval_only_config(cfg, ckpt: dict):
    """For --eval-only: the checkpoint's config decides the model, the CLI decides the data.
    The seed is the checkpoint's own; its --init file is not needed again (the checkpoint holds
    the adapter weights)."""
    cls = type(cfg)
    names = {f.name for f in dataclasses.fields(cls)}
    saved = cls(**{k: v for k, v in ckpt["config"].items() if k in names})
    keep = {k: getattr(cfg, k) for k in EVAL_ONLY_FROM_CLI}
    seed = ckpt.get("seed", ckpt["config"].get("seed_now", saved.seeds[0]))  # older files: seed_now
    keep.update(init="", seeds=[seed])
    return dataclasses.replace(saved, **keep)
