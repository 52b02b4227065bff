"""The scripts' `--adapter none|lora|mona`: config, apply, the freezing rule, checkpoints, counts.

The adapters themselves are in lora.py and mona.py (the ultrasound-CLIP paper, Qu et al.,
"Adapting Vision-Language Foundation Model for Next Generation Medical Ultrasound Image Analysis",
§3.1); both go on the vision tower only. This file holds the one list of adapter key patterns
(ADAPTER_KEYS), the one freezing rule (`freeze_backbone`, the official code's) and the one
adapter-checkpoint format:

- a checkpoint stores `adapter_config` (AdapterConfig as a dict) beside `adapter_state_dict`
  (adapter tensors only, CLIP key names such as `visual.transformer.resblocks.3.mona2...`);
  head weights are never in it, so `--init` never imports a head;
- a task model's checkpoint adds `head_state_dict` and, when backbone weights train,
  `model_state_dict` (`checkpoint_tensors` / `load_task_state`);
- `load_adapter(model, path)` reads such a file, adds the adapter when the model lacks it, checks
  the settings and loads the tensors. Other file formats plug in at `read_adapter`;
- every checkpoint records what it is (`what`: script, task, backbone, adapter, what trained);
  `checkpoint_identity` reads it from any file (inferring it for older ones and the official
  files), and each consumer checks it before any work (`check_init`, `check_identity`).
"""
from __future__ import annotations

import re
import warnings
from dataclasses import asdict, dataclass, fields, replace

import torch
import torch.nn as nn

from .fileio import load_checkpoint
from .lora import DEFAULT_TARGETS, LORA_TYPES, TARGETS, add_lora, lora_settings, mark_only_trainable
from .model import CLIP, ResidualAttentionBlock, Transformer, VisionTransformer
from .mona import VARIANTS, Mona

__all__ = ["AdapterConfig", "apply_adapter", "adapter_config_of", "load_adapter",
           "load_adapter_state_dict", "adapter_state_dict", "freeze_backbone",
           "checkpoint_tensors", "load_task_state", "count_parameters", "format_count",
           "checkpoint_identity", "check_identity", "check_init"]

KINDS = ("none", "lora", "mona")
# The one list of adapter key patterns: LoRA's tensors contain "lora_", Mona's "mona".
ADAPTER_KEYS = ("lora_", "mona")
HEAD = "head."  # a task model's head (heads.TaskModel.head)
# Settings that change the tensors or what they compute. Dropout does not, so a checkpoint may
# be loaded with another dropout rate.
CHECKED = {"lora": ("r", "alpha", "scaling", "targets"),
           "mona": ("bottleneck", "placement", "mona_variant")}


# ----------------------------------------------------------------------------- Mona inside our CLIP
# One Mona after each vision block, or two (after attention and after the MLP).
PLACEMENTS = ("after_block", "attn_and_mlp")


class MonaBlock(ResidualAttentionBlock):
    """A vision block with Mona: `mona1` after attention (placement "attn_and_mlp" only) and
    `mona2` after the MLP. It keeps the block's ln_1, attn, ln_2 and mlp (same keys)."""

    def __init__(self, block: ResidualAttentionBlock, bottleneck: int = 64,
                 placement: str = "after_block", dropout: float = 0.1, variant: str = "baseline"):
        nn.Module.__init__(self)  # not ResidualAttentionBlock's: it would build fresh weights
        for name, child in block.named_children():
            self.add_module(name, child)
        width = block.ln_1.normalized_shape[0]
        like = block.ln_1.weight
        self.placement = placement
        if placement == "attn_and_mlp":
            self.mona1 = Mona(width, bottleneck, dropout, variant).to(like.device, like.dtype)
        self.mona2 = Mona(width, bottleneck, dropout, variant).to(like.device, like.dtype)
        self.train(block.training)

    def forward(self, x: torch.Tensor, causal: bool = False, grid: tuple | None = None):
        if grid is None or causal:
            raise ValueError("MonaBlock needs the patch grid of a vision sequence: call it "
                             "through VisionTransformer.forward (which passes grid=); Mona is "
                             "for the vision tower only")
        x = self.attn_residual(x)  # the block's own residual (with its layer-scale, if any)
        if self.placement == "attn_and_mlp":
            x = self.mona1(x, grid)
        x = self.mlp_residual(x)
        return self.mona2(x, grid)


def _vision_tower(model: nn.Module) -> VisionTransformer:
    if isinstance(model, CLIP):
        return model.visual
    if isinstance(model, VisionTransformer):
        return model
    if isinstance(model, Transformer):
        raise TypeError("Mona is for the vision tower only: pass a CLIP model or its "
                        "VisionTransformer (model.visual), not a Transformer such as the text "
                        "tower (model.transformer), which has no patch grid")
    raise TypeError(f"add_mona takes a CLIP model or a VisionTransformer, got "
                    f"{type(model).__name__}; Mona is for the vision tower only")


def add_mona(model: nn.Module, bottleneck: int = 64, placement: str = "after_block",
             dropout: float = 0.1, variant: str = "baseline") -> nn.Module:
    """Add Mona (one of mona.VARIANTS) to every block of the vision tower of `model` (a CLIP or
    VisionTransformer).

    In place; returns `model`. Base weights are not frozen here: adapters.freeze_backbone does.
    """
    if placement not in PLACEMENTS:
        raise ValueError(f"Mona placement must be one of {PLACEMENTS}, got {placement!r}")
    if bottleneck < 1:
        raise ValueError(f"Mona bottleneck must be >= 1, got {bottleneck}")
    blocks = _vision_tower(model).transformer.resblocks
    if any(isinstance(b, MonaBlock) for b in blocks):
        raise ValueError("this vision tower already has Mona; build a fresh model to re-add it")
    for i, block in enumerate(blocks):
        blocks[i] = MonaBlock(block, bottleneck, placement, dropout, variant)
    return model


def mona_settings(model: nn.Module) -> dict | None:
    """The Mona settings found in `model` (bottleneck, placement, dropout, variant), or None."""
    block = next((m for m in model.modules() if isinstance(m, MonaBlock)), None)
    if block is None:
        return None
    return {"bottleneck": block.mona2.project1.out_features, "placement": block.placement,
            "dropout": block.mona2.dropout.p, "variant": block.mona2.variant}


# ----------------------------------------------------------------------------- official adapter files
# The official NextGen-UIA Mona and LoRA files, in our key names.
MONA_KEY = re.compile(r"^visual\.transformer\.resblocks\.(\d+)\.mona\.(.+)$")
# Each variant's parts: our Mona's tensor names, which are the official ones (mona.py).
MONA_PARTS = {v: frozenset(Mona(4, 4, variant=v).state_dict()) for v in VARIANTS}
# The parts only some variants have, and the variant each marks (both together: hybrid).
VARIANT_MARKS = {"adapter_conv.noise_estimator.": "noise_aware", "adapter_conv.freq_filter": "freq_enhanced"}
LORA_KEY = re.compile(r"^(.*\.attn)\.(q|k|v)?_?proj\.w_lora_(A|B)$")


def is_official_mona(obj) -> bool:
    """A plain dict whose keys are all `visual.transformer.resblocks.N.mona.*` tensors."""
    return isinstance(obj, dict) and bool(obj) and all(
        isinstance(k, str) and MONA_KEY.match(k) for k in obj)


def is_official_lora(obj) -> bool:
    return isinstance(obj, dict) and obj.get("adapter_type") == "lora" and "lora_state_dict" in obj


def _marked_variant(parts) -> str:
    """The variant an official block's parts point to: noise_estimator -> noise_aware,
    freq_filter -> freq_enhanced, both -> hybrid, neither -> baseline."""
    marks = {v for mark, v in VARIANT_MARKS.items() if any(p.startswith(mark) for p in parts)}
    return "hybrid" if len(marks) == 2 else next(iter(marks), "baseline")


def _official_block_variant(block: int, parts) -> str:
    """The variant of one block of an official Mona file; its parts must be exactly that
    variant's (the official code injects one class whole, `inject_mona_variant_to_clip`)."""
    variant, key = _marked_variant(parts), f"visual.transformer.resblocks.{block}.mona."
    missing = sorted(key + p for p in MONA_PARTS[variant] - set(parts))
    foreign = sorted(key + p for p in set(parts) - MONA_PARTS[variant])
    if missing or foreign:
        wrong = ([f"lacks {len(missing)} of its keys {missing[:4]}"] if missing else []) + (
            [f"has {len(foreign)} keys no variant has {foreign[:4]}"] if foreign else [])
        raise ValueError(
            f"official Mona file: block {block} fits none of the official variants {VARIANTS}: "
            f"its keys point to the {variant} Mona, but it {' and '.join(wrong)}. Is the file "
            f"complete, and a best_model.pth of the official fine-tuning (src/models/clip/finetune.py)?")
    return variant


def convert_official_mona(sd: dict) -> tuple[dict, dict]:
    """best_model.pth of any official variant -> (Mona settings with the variant told from the
    keys, state dict with `...resblocks.N.mona2.<part>` keys: Mona after each block)."""
    parts: dict[int, set] = {}
    for k in sd:
        block, part = MONA_KEY.match(k).groups()
        parts.setdefault(int(block), set()).add(part)
    variants = {b: _official_block_variant(b, p) for b, p in sorted(parts.items())}
    if len(set(variants.values())) > 1:
        raise ValueError(f"official Mona file: its blocks are of different variants {variants}; "
                         f"the official code builds one variant in every block")
    out = {}
    for k, v in sd.items():
        block, part = MONA_KEY.match(k).groups()
        out[f"visual.transformer.resblocks.{block}.mona2.{part}"] = v
    first = next(k for k in sd if k.endswith("project1.weight"))
    settings = {"kind": "mona", "bottleneck": int(sd[first].shape[0]), "placement": "after_block",
                "mona_variant": next(iter(variants.values()))}
    return settings, out


def convert_official_lora(ckpt: dict) -> tuple[dict, dict]:
    """The official LoRA dict -> (LoRA settings, state dict with clip_us LoRA keys).

    Only the LoRA tensors are taken; any frozen base weights the dict may also hold are the
    CLIP weights the model already has, and are left out.
    """
    out, targets = {}, set()
    for k, v in ckpt["lora_state_dict"].items():
        m = LORA_KEY.match(k)
        if m is None:
            if "lora" in k:
                raise ValueError(f"official LoRA file: key {k!r} is not a q/k/v/out projection "
                                 f"LoRA tensor of the vision tower; clip_us cannot place it")
            continue
        attn, target, ab = m.groups()
        target = target or "o"
        targets.add(target)
        name = f"{attn}.lora_{ab}_{target}" if target != "o" else f"{attn}.out_proj.lora_{ab}"
        out[name] = v
    if not out:
        raise ValueError("official LoRA file: lora_state_dict holds no `*_proj.w_lora_A/B` tensors")
    settings = {"kind": "lora", "r": int(ckpt.get("lora_r", 16)),
                "alpha": float(ckpt.get("lora_alpha", 32)),
                "lora_dropout": float(ckpt.get("lora_dropout", 0.1)), "scaling": "rslora",
                "targets": tuple(t for t in TARGETS if t in targets)}  # canonical order
    return settings, out


# ----------------------------------------------------------------------------- --adapter
# Config, apply, freezing, checkpoints.
@dataclass
class AdapterConfig:
    kind: str = "none"                      # none | lora | mona
    r: int = 16                             # LoRA rank
    alpha: float = 32.0                     # LoRA alpha
    scaling: str = "rslora"                 # rslora: alpha/sqrt(r) (official); standard: alpha/r
    targets: tuple = DEFAULT_TARGETS        # LoRA targets; "mlp" adds c_fc and c_proj
    lora_dropout: float = 0.1
    lora_shared_dropout: bool = False       # one dropout draw for q, k, v (faster; not official)
    bottleneck: int = 64                    # Mona down-projection width
    placement: str = "after_block"          # Mona: after_block (official code) | attn_and_mlp
    mona_dropout: float = 0.1
    mona_variant: str = "baseline"          # Mona: baseline | noise_aware | freq_enhanced | hybrid

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"adapter kind must be one of {KINDS}, got {self.kind!r}")
        self.targets = tuple(self.targets)  # JSON turns tuples into lists

    @classmethod
    def from_dict(cls, d: dict) -> "AdapterConfig":
        unknown = set(d) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"adapter_config has unknown fields {sorted(unknown)}; was it "
                             f"written by a newer clip_us?")
        return cls(**d)


def is_adapter_key(name: str) -> bool:
    return any(a in name for a in ADAPTER_KEYS) and not name.startswith(HEAD)


def adapter_trains(kind: str, setting: str = "auto") -> bool:
    """Whether `--adapter kind` trains in the supervised stage under `--adapter-train setting`.
    "auto" is the official code's rule: it trains every parameter whose name contains "mona",
    so Mona trains and LoRA keeps its initial (or --init) weights."""
    if setting not in ("auto", "yes", "no"):
        raise ValueError(f"--adapter-train must be auto, yes or no, got {setting!r}")
    return kind == "mona" if setting == "auto" else setting == "yes"


def freeze_backbone(model: nn.Module, train_adapters: bool = True) -> nn.Module:
    """The official code's rule: every backbone parameter whose name has no adapter key is frozen.

    The head (`head.*`) trains; the adapters train unless `train_adapters` is False (how the
    official code ends up treating LoRA in the supervised stage: `--adapter-train no`).
    """
    patterns = (HEAD,) + (ADAPTER_KEYS if train_adapters else ())
    return mark_only_trainable(model, patterns)


def apply_adapter(model: nn.Module, cfg: AdapterConfig, freeze: bool = True) -> nn.Module:
    """Add cfg's adapter to the vision tower of `model` (a CLIP or VisionTransformer), in place.

    With freeze=True and an adapter, only adapter (and `head`) parameters keep requires_grad.
    """
    visual = getattr(model, "visual", model)
    if cfg.kind == "lora":
        add_lora(visual, r=cfg.r, alpha=cfg.alpha, dropout=cfg.lora_dropout,
                 targets=cfg.targets, scaling=cfg.scaling,
                 shared_dropout=cfg.lora_shared_dropout)
    elif cfg.kind == "mona":
        add_mona(visual, bottleneck=cfg.bottleneck, placement=cfg.placement,
                 dropout=cfg.mona_dropout, variant=cfg.mona_variant)
    if freeze and cfg.kind != "none":
        freeze_backbone(model)
    return model


def adapter_config_of(model: nn.Module) -> AdapterConfig:
    """Read the adapter settings back from a model's modules."""
    lora, mona = lora_settings(model), mona_settings(model)
    if lora and mona:
        raise ValueError("the model has both LoRA and Mona; AdapterConfig describes one kind")
    if lora:
        return AdapterConfig(kind="lora", r=lora["r"], alpha=lora["alpha"],
                             scaling=lora["scaling"], targets=lora["targets"],
                             lora_dropout=lora["dropout"],
                             lora_shared_dropout=lora["shared_dropout"])
    if mona:
        return AdapterConfig(kind="mona", bottleneck=mona["bottleneck"],
                             placement=mona["placement"], mona_dropout=mona["dropout"],
                             mona_variant=mona["variant"])
    return AdapterConfig()


ADAPTER_LABELS = {"none": "vanilla", "lora": "LoRA", "mona": "Mona"}  # --adapter -> row names


def check_adapter_config(saved: AdapterConfig, model: nn.Module) -> None:
    """Raise ValueError naming every setting where `saved` and the model's adapters differ."""
    have = adapter_config_of(model)
    if saved.kind != have.kind:
        raise ValueError(f"checkpoint has adapter {saved.kind!r} but the model has "
                         f"{have.kind!r}: build the model with --adapter {saved.kind}")
    diffs = [f"{k}={_show(getattr(saved, k))} but the model has {k}={_show(getattr(have, k))}"
             for k in CHECKED.get(saved.kind, ())
             if _norm(getattr(saved, k)) != _norm(getattr(have, k))]
    if diffs:
        raise ValueError(f"checkpoint has {ADAPTER_LABELS[saved.kind]} " + "; ".join(diffs) +
                         ": add the adapter with the checkpoint's settings")


def _norm(v):
    # targets compare as sets; 32 and 32.0 are the same alpha
    return frozenset(v) if isinstance(v, (tuple, list)) else v


def _show(v):
    return ",".join(v) if isinstance(v, (tuple, list)) else v


def adapter_state_dict(model: nn.Module) -> dict:
    """Only the adapter tensors of model.state_dict(), keys unchanged; never a head's."""
    return {k: v for k, v in model.state_dict().items() if is_adapter_key(k)}


def load_adapter_state_dict(model: nn.Module, sd: dict, adapter_config) -> nn.Module:
    """Load adapter tensors saved by adapter_state_dict, after checking the settings.

    `adapter_config` is the checkpoint's AdapterConfig or its dict. Every adapter tensor of the
    model must be in `sd`, every key of `sd` must be an adapter tensor of the model, and shapes
    must agree.
    """
    saved = adapter_config if isinstance(adapter_config, AdapterConfig) else \
        AdapterConfig.from_dict(dict(adapter_config))
    check_adapter_config(saved, model)
    if any(isinstance(m, LORA_TYPES) and m.lora_merged for m in model.modules()):
        raise ValueError("the model's LoRA is merged: call unmerge_lora(model) before loading "
                         "adapter weights, or they would be added on top of the merged ones")
    own = adapter_state_dict(model)
    unexpected = [k for k in sd if k not in own]
    missing = [k for k in own if k not in sd]
    wrong = [f"{k} {tuple(sd[k].shape)} vs {tuple(own[k].shape)}" for k in sd
             if k in own and sd[k].shape != own[k].shape]
    for what, keys in (("not adapter tensors of the model", unexpected),
                       ("missing from the checkpoint", missing),
                       ("with the wrong shape (checkpoint vs model)", wrong)):
        if keys:
            raise ValueError(f"adapter state dict: {len(keys)} keys {what}: {keys[:5]}"
                             f"{' ...' if len(keys) > 5 else ''}")
    model.load_state_dict(sd, strict=False)
    return model


# ----------------------------------------------------------------------------- what a checkpoint is
# Every checkpoint records what it is as `what` (`identity`): the script that wrote it, its task
# (seg, cls, contrastive), the backbone, the adapter kind, what trained (train_contrastive.py's
# --train mode; for train_seg/train_cls "adapter+head" or "head") and, for a run started from
# --init, that file's record with its path. Each consumer checks it before any work.
SUPERVISED = {"train_seg": "seg", "train_cls": "cls"}  # script -> task
TASK_NAMES = {"seg": "segmentation", "cls": "classification"}
OFFICIAL = "NextGen-UIA"  # the official code's adapter files
ADAPTER_NAMES = {"none": "no adapter", "lora": "a LoRA adapter", "mona": "a Mona adapter"}


def identity(script: str, task: str, backbone: str, adapter: str, train: str,
             init: dict | None = None) -> dict:
    """The `what` record a checkpoint holds (see above)."""
    return {"script": script, "task": task, "backbone": backbone, "adapter": adapter,
            "train": train, "init": init}


def supervised_train(adapter: str, adapter_train: str = "auto") -> str:
    """`what.train` of a train_seg/train_cls checkpoint: whether its adapter trained too."""
    return "adapter+head" if adapter_trains(adapter, adapter_train) else "head"


def _older_identity(ckpt: dict, path) -> dict:
    """The record of a clip_us checkpoint written before `what` existed, from its keys."""
    cfg = ckpt.get("config") or {}
    adapter = (ckpt.get("adapter_config") or {}).get("kind", "none")
    script = ckpt.get("script") or ("train_contrastive" if "train_mode" in ckpt else None)
    if script is None and "head_state_dict" in ckpt:
        script = "train_cls" if "cls_head" in cfg else "train_seg"
    if script in SUPERVISED:
        init = {"path": cfg["init"], "script": "unknown"} if cfg.get("init") else None
        return identity(script, SUPERVISED[script], cfg.get("backbone", "clip"), adapter,
                        supervised_train(adapter, cfg.get("adapter_train", "auto")), init)
    if script == "train_contrastive":
        return identity(script, "contrastive", cfg.get("model", "clip"), adapter,
                        ckpt.get("train_mode") or cfg.get("train", "adapter"))
    if "adapter_config" in ckpt:  # adapter tensors saved from Python, no record of their training
        return identity("unknown", "adapter", "clip", adapter, "adapter")
    raise ValueError(f"{path} is not a checkpoint clip_us knows: it has no adapter_config and is "
                     f"neither an official NextGen-UIA Mona/LoRA file nor an EchoCare-CLIP "
                     f"checkpoint. --init and --checkpoint take a best.pt written by train_seg.py, "
                     f"train_cls.py or train_contrastive.py")


def checkpoint_identity(ckpt: dict, path="checkpoint") -> dict:
    """What any checkpoint is (`identity`'s record): ours (its `what`, or inferred from the
    keys of one written before it), an official NextGen-UIA Mona/LoRA file, or an EchoCare-CLIP
    dual encoder. A file that is none of them is an error naming what is expected."""
    if isinstance(ckpt.get("what"), dict):
        return ckpt["what"]
    for is_official, kind in ((is_official_mona, "mona"), (is_official_lora, "lora")):
        if is_official(ckpt):
            return identity(OFFICIAL, "contrastive", "clip", kind, "adapter")
    if ckpt.get("model") == "echocare":
        return identity(ckpt.get("script", "unknown"), "contrastive", "echocare", "none",
                        ckpt.get("train", "heads"))
    return _older_identity(ckpt, path)


def describe(what: dict) -> str:
    """E.g. "a train_contrastive.py checkpoint (--train adapter, a Mona adapter)"."""
    adapter = ADAPTER_NAMES[what["adapter"]]
    if what["backbone"] == "echocare":
        return f"an EchoCare-CLIP dual-encoder checkpoint (--train {what['train']})"
    if what["script"] == OFFICIAL:
        return f"an official NextGen-UIA {ADAPTER_NAMES[what['adapter']][2:]} file"
    if what["task"] in TASK_NAMES:
        return (f"a {what['script']}.py checkpoint ({TASK_NAMES[what['task']]}, --backbone "
                f"{what['backbone']}, {adapter})")
    if what["task"] == "contrastive":
        return f"a train_contrastive.py checkpoint (--train {what['train']}, {adapter})"
    return f"an adapter file ({adapter}) with no record of the script that wrote it"


def check_identity(ckpt, hint: str = "", **expected) -> dict:
    """The record of `ckpt` (a checkpoint file, or (path, dict) already read), refused with one
    line naming each field that differs from `expected` (e.g. script="train_seg",
    adapter="mona"), then `hint` (what to type instead). What --resume checks of a last.pt."""
    path, ckpt = ckpt if isinstance(ckpt, tuple) else (ckpt, load_checkpoint(ckpt))
    what = checkpoint_identity(ckpt, path)
    diffs = [f"its {k} is {what.get(k)}, not {v}" for k, v in expected.items() if what.get(k) != v]
    if diffs:
        raise ValueError(f"{path} is {describe(what)}, which does not fit here: "
                         f"{'; '.join(diffs)}" + (f". {hint}" if hint else ""))
    return what


def adapter_mismatch(path, held: str, given: str) -> str:
    """The message for --init PATH holding adapter `held` while --adapter `given` was given."""
    return (f"--init {path} holds {ADAPTER_NAMES[held]} but --adapter {given} was given: drop "
            f"--adapter ({path}'s adapter is used) or pass --adapter {held}")


def check_init(path, backbone: str, arch: str, adapter: str | None = None) -> dict:
    """--init PATH checked before any work, for a model of `backbone` and `arch` and the
    --adapter given (None: not given, the file's is used); its record, with its path.
    Contrastive fine-tunes (train_contrastive.py, every --train mode; the official NextGen-UIA
    files) and supervised checkpoints of the same backbone are taken; an EchoCare-CLIP dual
    encoder is refused, pointing at evaluate.py."""
    ckpt = load_checkpoint(path)
    what = checkpoint_identity(ckpt, path)
    if what["backbone"] == "echocare":
        raise ValueError(f"--init {path} is {describe(what)}: it has no CLIP adapter or tower to "
                         f"start from; evaluate it with evaluate.py --checkpoint {path}")
    if what["backbone"] != backbone:
        raise ValueError(f"--init {path} is {describe(what)}, for --backbone {what['backbone']}, "
                         f"not {backbone}: pass --backbone {what['backbone']}")
    trained_arch = (ckpt.get("config") or {}).get("arch", arch)
    if trained_arch != arch:
        raise ValueError(f"--init {path} was trained with --arch {trained_arch}, not {arch}: "
                         f"pass --arch {trained_arch}")
    if adapter is not None and adapter != what["adapter"]:
        raise ValueError(adapter_mismatch(path, what["adapter"], adapter))
    return {"path": str(path), **what}


def _read(path) -> tuple[AdapterConfig, dict, dict, bool | None]:
    """(adapter settings, adapter tensors, fine-tuned backbone tensors, clip_norm) of a file:
    a clip_us checkpoint, or the official NextGen-UIA Mona (`best_model.pth`) or LoRA dict; an
    EchoCare-CLIP checkpoint, which has no CLIP adapter, is refused."""
    ckpt = load_checkpoint(path)
    for is_official, convert in ((is_official_mona, convert_official_mona),
                                 (is_official_lora, convert_official_lora)):
        if is_official(ckpt):
            settings, sd = convert(ckpt)
            return AdapterConfig(**settings), sd, {}, False  # the official code fed [0, 1] pixels
    what = checkpoint_identity(ckpt, path)
    if what["backbone"] == "echocare":
        raise ValueError(f"{path} is {describe(what)}: it holds no CLIP adapter to load; evaluate "
                         f"it with evaluate.py --checkpoint {path} (from Python: "
                         f"clip_us.echocare.load)")
    if "adapter_config" not in ckpt or "adapter_state_dict" not in ckpt:
        raise KeyError(f"{path} is {describe(what)} but has no adapter_config/adapter_state_dict: "
                       f"is it complete?")
    norm = (ckpt.get("normalisation") or {}).get("clip_norm",
                                                 (ckpt.get("config") or {}).get("clip_norm"))
    return (AdapterConfig.from_dict(dict(ckpt["adapter_config"])), ckpt["adapter_state_dict"],
            dict(ckpt.get("model_state_dict") or {}), norm)


def read_adapter(path) -> tuple[AdapterConfig, dict]:
    """(adapter settings, adapter tensors) from a file: checkpoints written by clip_us (any
    script's best.pt / last.pt), or the official NextGen-UIA Mona / LoRA files
    (convert_official_mona / convert_official_lora above; an official Mona file of any variant)."""
    cfg, sd, _, _ = _read(path)
    return cfg, sd


def load_backbone_state(model: nn.Module, sd: dict, path) -> nn.Module:
    """A checkpoint's fine-tuned backbone (`model_state_dict`, CLIP key names) into a CLIP or
    its vision tower; adapter tensors come from adapter_state_dict, heads never."""
    own = model.state_dict()
    if not any(k.startswith("visual.") for k in own):  # a vision tower: keys without "visual."
        sd = {k[len("visual."):]: v for k, v in sd.items() if k.startswith("visual.")}
    sd = {k: v for k, v in sd.items() if not is_adapter_key(k) and not k.startswith(HEAD)}
    unknown = [k for k in sd if k not in own]
    wrong = [f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in sd.items()
             if k in own and v.shape != own[k].shape]
    if unknown or wrong or not sd:
        raise ValueError(f"{path}: its model_state_dict does not fit this model (architecture "
                         f"differs?): {len(unknown)} unknown keys {unknown[:3]}, {len(wrong)} "
                         f"with other shapes {wrong[:3]}")
    model.load_state_dict(sd, strict=False)
    return model


def _run_settings(saved: AdapterConfig, run: AdapterConfig, path) -> AdapterConfig:
    """The adapter a run adds for --init `path`: the file's kind and the settings that shape its
    tensors (CHECKED), the run's own elsewhere (dropout). A kind the file lacks is refused."""
    if run.kind != saved.kind:
        raise ValueError(adapter_mismatch(path, saved.kind, run.kind))
    return replace(run, **{k: getattr(saved, k) for k in CHECKED.get(saved.kind, ())})


def load_adapter(model: nn.Module, path, clip_norm: bool | None = None,
                 settings: AdapterConfig | None = None) -> nn.Module:
    """Give `model` (a CLIP or its vision tower) the adapter saved at `path`, with its weights,
    and the fine-tuned backbone weights when the checkpoint has them (train_contrastive.py
    --train heads|image|text|full, or any script whose backbone trained).

    The adapter is added (unfrozen: requires_grad is left as it is) when the model has none;
    a model that has a different adapter, or other settings, is an error naming them. With
    `clip_norm` (the run's normalisation), a checkpoint trained with the other one is warned
    about: its weights saw differently scaled pixels. `settings`: the run's adapter (--init): its
    kind must be the file's; the file's settings shape the tensors, the run's set the dropout.
    Files that are no adapter (an EchoCare-CLIP checkpoint) are refused with one line.
    """
    cfg, sd, backbone, norm = _read(path)
    if settings is not None:
        cfg = _run_settings(cfg, settings, path)
    if cfg.kind != "none" and adapter_config_of(model).kind == "none":
        apply_adapter(model, cfg, freeze=False)
    load_adapter_state_dict(model, sd, cfg)
    if backbone:
        load_backbone_state(model, backbone, path)
    if clip_norm is not None and norm is not None and bool(norm) != bool(clip_norm):
        warnings.warn(f"--init {path} was trained on {_norm_name(norm)} but this run feeds "
                      f"{_norm_name(clip_norm)}; pass {'--clip-norm' if norm else '--no-clip-norm'}"
                      f" to match it", stacklevel=2)
    return model


def _norm_name(clip_norm: bool) -> str:
    return "CLIP mean/std-normalised pixels" if clip_norm else "[0, 1] pixels"


def backbone_trains(model: nn.Module) -> bool:
    """True when a parameter outside the head and the adapters requires grad."""
    return any(p.requires_grad for k, p in model.named_parameters()
               if not k.startswith(HEAD) and not is_adapter_key(k))


def checkpoint_tensors(model: nn.Module) -> dict:
    """A model's tensors in the checkpoint layout: `adapter_config` (the settings the model's
    adapter has, which an --init file may have set), `adapter_state_dict` (CLIP key names, so
    `--init` works across scripts), `head_state_dict`, and `model_state_dict` (everything but
    the head) only when backbone weights train. A model that owns its checkpoint layout (e.g.
    echocare.EchoCareCLIP) has a `checkpoint_tensors()` method, which decides instead."""
    if hasattr(model, "checkpoint_tensors"):
        return model.checkpoint_tensors()
    sd = model.state_dict()
    out = {"adapter_config": asdict(adapter_config_of(model)),
           "adapter_state_dict": adapter_state_dict(model),
           "head_state_dict": {k[len(HEAD):]: v for k, v in sd.items() if k.startswith(HEAD)}}
    if backbone_trains(model):
        out["model_state_dict"] = {k: v for k, v in sd.items() if not k.startswith(HEAD)}
    return out


def load_task_state(model: nn.Module, ckpt: dict) -> nn.Module:
    """Inverse of checkpoint_tensors. Differing adapter settings or keys are errors naming them."""
    if hasattr(model, "load_checkpoint_tensors"):
        return model.load_checkpoint_tensors(ckpt)
    if "model_state_dict" in ckpt:
        model.load_state_dict(ckpt["model_state_dict"], strict=False)
    if "adapter_config" in ckpt:
        load_adapter_state_dict(model, ckpt["adapter_state_dict"], ckpt["adapter_config"])
    if ckpt.get("head_state_dict"):
        model.head.load_state_dict(ckpt["head_state_dict"])
    return model


def count_parameters(module: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; shared parameters are counted once."""
    params = list(module.parameters())  # parameters() already yields each tensor once
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def format_count(module: nn.Module) -> str:
    """E.g. "trainable 1,179,648 / 87,372,288 (1.35%)"."""
    trainable, total = count_parameters(module)
    return f"trainable {trainable:,} / {total:,} ({100 * trainable / max(total, 1):.2f}%)"

