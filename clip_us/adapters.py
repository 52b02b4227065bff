"""The training scripts' `--adapter none|lora|mona`: config, apply, checkpoints, parameter counts.

The adapters themselves are in lora.py and mona.py (seed 003 §3.1; DESIGN.md "LoRA", "Mona in
CLIP", "Which parameters train"). Both go on the vision tower only. A checkpoint stores
`adapter_config` (this dataclass, as a dict) beside `adapter_state_dict`; loading checks that the
model was built with the same settings and names any mismatch.
"""
from __future__ import annotations

from dataclasses import dataclass, fields

import torch.nn as nn

from .lora import (ADAPTER_PATTERNS, LORA_TYPES, adapter_state_dict, add_lora, lora_settings,
                   mark_only_trainable)
from .mona import add_mona, mona_settings

__all__ = ["AdapterConfig", "apply_adapter", "adapter_config_of", "load_adapter_state_dict",
           "adapter_state_dict", "mark_only_trainable", "count_parameters", "format_count"]

KINDS = ("none", "lora", "mona")
# Settings that change the tensors or what they compute. Dropout does not, so a checkpoint may
# be loaded with another dropout rate.
CHECKED = {"lora": ("r", "alpha", "scaling", "targets"), "mona": ("bottleneck", "placement")}


@dataclass
class AdapterConfig:
    kind: str = "none"                      # none | lora | mona
    r: int = 16                             # LoRA rank
    alpha: float = 32.0                     # LoRA alpha
    scaling: str = "rslora"                 # rslora: alpha/sqrt(r) (official); standard: alpha/r
    targets: tuple = ("q", "k", "v", "o")   # LoRA targets; "mlp" adds c_fc and c_proj
    lora_dropout: float = 0.1
    bottleneck: int = 64                    # Mona down-projection width
    placement: str = "after_block"          # Mona: after_block (official code) | attn_and_mlp
    mona_dropout: float = 0.1

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


def apply_adapter(model: nn.Module, cfg: AdapterConfig, freeze: bool = True) -> nn.Module:
    """Add cfg's adapter to the vision tower of `model` (a CLIP or VisionTransformer), in place.

    With freeze=True and an adapter, only adapter (and `head`) parameters keep requires_grad.
    """
    visual = getattr(model, "visual", model)
    if cfg.kind == "lora":
        add_lora(visual, r=cfg.r, alpha=cfg.alpha, dropout=cfg.lora_dropout,
                 targets=cfg.targets, scaling=cfg.scaling)
    elif cfg.kind == "mona":
        add_mona(visual, bottleneck=cfg.bottleneck, placement=cfg.placement,
                 dropout=cfg.mona_dropout)
    if freeze and cfg.kind != "none":
        mark_only_trainable(model)
    return model


def adapter_config_of(model: nn.Module) -> AdapterConfig:
    """Read the adapter settings back from a model's modules."""
    lora, mona = lora_settings(model), mona_settings(model)
    if lora and mona:
        raise ValueError("the model has both LoRA and Mona; AdapterConfig describes one kind")
    if lora:
        return AdapterConfig(kind="lora", r=lora["r"], alpha=lora["alpha"],
                             scaling=lora["scaling"], targets=lora["targets"],
                             lora_dropout=lora["dropout"])
    if mona:
        return AdapterConfig(kind="mona", bottleneck=mona["bottleneck"],
                             placement=mona["placement"], mona_dropout=mona["dropout"])
    return AdapterConfig()


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
        name = {"lora": "LoRA", "mona": "Mona"}[saved.kind]
        raise ValueError(f"checkpoint has {name} " + "; ".join(diffs) +
                         ": add the adapter with the checkpoint's settings")


def _norm(v):
    # targets compare as sets; 32 and 32.0 are the same alpha
    return frozenset(v) if isinstance(v, (tuple, list)) else v


def _show(v):
    return ",".join(v) if isinstance(v, (tuple, list)) else v


def load_adapter_state_dict(model: nn.Module, sd: dict, adapter_config) -> nn.Module:
    """Load adapter (and head) tensors saved by adapter_state_dict, after checking the settings.

    `adapter_config` is the checkpoint's AdapterConfig or its dict. Every adapter tensor of the
    model must be in `sd`, every key of `sd` must be in the model, and shapes must agree.
    """
    saved = adapter_config if isinstance(adapter_config, AdapterConfig) else \
        AdapterConfig.from_dict(dict(adapter_config))
    check_adapter_config(saved, model)
    if any(isinstance(m, LORA_TYPES) and m.lora_merged for m in model.modules()):
        raise ValueError("the model's LoRA is merged: call unmerge_lora(model) before loading "
                         "adapter weights, or they would be added on top of the merged ones")
    own = model.state_dict()
    unexpected = [k for k in sd if k not in own]
    heads = any("head" in k for k in sd)
    missing = [k for k in own if k not in sd and any(p in k for p in ADAPTER_PATTERNS)
               and (heads or "head" not in k)]
    wrong = [f"{k} {tuple(sd[k].shape)} vs {tuple(own[k].shape)}" for k in sd
             if k in own and sd[k].shape != own[k].shape]
    for what, keys in (("not in the model", unexpected), ("missing from the checkpoint", missing),
                       ("with the wrong shape (checkpoint vs model)", wrong)):
        if keys:
            raise ValueError(f"adapter state dict: {len(keys)} keys {what}: {keys[:5]}"
                             f"{' ...' if len(keys) > 5 else ''}")
    model.load_state_dict(sd, strict=False)
    return model


def count_parameters(module: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; shared parameters are counted once."""
    params = list(module.parameters())  # parameters() already yields each tensor once
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def format_count(module: nn.Module) -> str:
    """E.g. "trainable 1,179,648 / 87,372,288 (1.35%)"."""
    trainable, total = count_parameters(module)
    return f"trainable {trainable:,} / {total:,} ({100 * trainable / max(total, 1):.2f}%)"

