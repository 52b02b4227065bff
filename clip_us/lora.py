"""LoRA for CLIP's packed attention projections (and any nn.Linear), with merging and freezing.

LoRA (Hu et al., 2022) adds a low-rank update to a frozen weight: W x + s * B (A dropout(x)), with
A [r, in] kaiming-uniform(a=sqrt(5)) and B [out, r] zeros, so a fresh adapter changes nothing.
Seed 003 §3.1 puts it on the q, k, v and output projections of every vision block, r=16, alpha=32,
dropout 0.1 (DESIGN.md, "LoRA").

- Scaling: "rslora" gives s = alpha / sqrt(r), what the official code (jinggqu/NextGen-UIA) does,
  and is the default. "standard" gives classic LoRA's s = alpha / r.
- q, k and v live in one packed `in_proj_weight` [3D, D] (rows q, k, v), as in OpenAI's
  checkpoints. `LoRAAttention` adds each targeted delta to its slice of the packed projection
  instead of splitting the weight, so every OpenAI key keeps its name. Each target has its own A,
  B and dropout draw, as the official code's separate q/k/v layers do.
- LoRA tensors are new keys containing "lora_" (`attn.lora_A_q`, `attn.out_proj.lora_B`, ...).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .model import MLP, Attention

QKV = ("q", "k", "v")
TARGETS = ("q", "k", "v", "o", "mlp")


def lora_scaling(r: int, alpha: float, scaling: str) -> float:
    """s = alpha/sqrt(r) for "rslora" (the official code, our default), alpha/r for "standard"."""
    if scaling == "rslora":
        return alpha / math.sqrt(r)
    if scaling == "standard":
        return alpha / r
    raise ValueError(f"LoRA scaling must be 'rslora' or 'standard', got {scaling!r}")


def _adopt(new: nn.Module, base: nn.Module) -> None:
    """Make `new` hold `base`'s parameters, buffers, submodules and plain attributes (the same
    objects, so no copy and no renamed key). Names starting with "lora_" are LoRA's own: skipped,
    which is also how merge_lora(remove=True) turns a LoRA module back into a plain one."""
    nn.Module.__init__(new)
    for store in ("_parameters", "_buffers", "_modules"):
        getattr(new, store).update({k: v for k, v in getattr(base, store).items()
                                    if not k.startswith("lora_")})
    new.__dict__.update({k: v for k, v in vars(base).items()
                         if not k.startswith(("_", "lora_"))})


def _lora_pair(out_features: int, in_features: int, r: int, like: torch.Tensor):
    """A [r, in] kaiming-uniform(a=sqrt(5)) and B [out, r] zeros, on `like`'s device and dtype."""
    A = nn.Parameter(like.new_empty(r, in_features))
    nn.init.kaiming_uniform_(A, a=math.sqrt(5))
    return A, nn.Parameter(like.new_zeros(out_features, r))


class LoRALinear(nn.Linear):
    """nn.Linear + s * B A on a dropout of the input; `weight`/`bias` keep their key names."""

    def __init__(self, base: nn.Linear, r: int = 16, alpha: float = 32, dropout: float = 0.1,
                 scaling: str = "rslora"):
        _adopt(self, base)
        if r < 1:
            raise ValueError(f"LoRA rank r must be >= 1, got {r}")
        self.lora_r, self.lora_alpha, self.lora_scaling_kind = r, alpha, scaling
        self.lora_scaling = lora_scaling(r, alpha, scaling)
        self.lora_merged = False
        self.lora_dropout = nn.Dropout(dropout)
        self.lora_A, self.lora_B = _lora_pair(self.out_features, self.in_features, r, self.weight)

    def delta_weight(self) -> torch.Tensor:
        return self.lora_scaling * self.lora_B @ self.lora_A  # [out, in]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, self.weight, self.bias)
        if self.lora_merged:  # the delta is inside `weight` already
            return out
        # Scale the rank-r tensor, not the [..., out] one: same result, far less memory traffic.
        low = F.linear(self.lora_dropout(x), self.lora_A) * self.lora_scaling  # [..., r]
        return out + F.linear(low, self.lora_B)

    @torch.no_grad()
    def merge(self, sign: float = 1.0) -> None:
        self.weight += sign * self.delta_weight().to(self.weight.dtype)
        self.lora_merged = sign > 0


class LoRAAttention(Attention):
    """Attention whose packed q/k/v projection carries LoRA deltas on the targeted slices."""

    def __init__(self, base: Attention, r: int = 16, alpha: float = 32, dropout: float = 0.1,
                 targets=QKV, scaling: str = "rslora"):
        _adopt(self, base)
        targets = tuple(t for t in QKV if t in targets)  # canonical q, k, v order
        if r < 1 or not targets:
            raise ValueError(f"LoRAAttention needs r >= 1 and some of q, k, v; got r={r}, "
                             f"targets={targets}")
        self.lora_r, self.lora_alpha, self.lora_scaling_kind = r, alpha, scaling
        self.lora_scaling = lora_scaling(r, alpha, scaling)
        self.lora_targets, self.lora_merged = targets, False
        self.lora_dropout = nn.Dropout(dropout)
        width = self.in_proj_weight.shape[1]
        for t in targets:
            A, B = _lora_pair(width, width, r, self.in_proj_weight)
            setattr(self, f"lora_A_{t}", A)
            setattr(self, f"lora_B_{t}", B)

    def delta_weight(self, t: str) -> torch.Tensor:
        return self.lora_scaling * getattr(self, f"lora_B_{t}") @ getattr(self, f"lora_A_{t}")

    def in_proj(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, self.in_proj_weight, self.in_proj_bias)  # [..., 3D], q | k | v
        if self.lora_merged:
            return out
        parts = list(out.chunk(3, dim=-1))  # 3 x [..., D]
        for t in self.lora_targets:
            i = QKV.index(t)
            low = F.linear(self.lora_dropout(x), getattr(self, f"lora_A_{t}"))  # [..., r]
            parts[i] = parts[i] + F.linear(low * self.lora_scaling, getattr(self, f"lora_B_{t}"))
        return torch.cat(parts, dim=-1)  # [..., 3D]

    @torch.no_grad()
    def merge(self, sign: float = 1.0) -> None:
        D = self.in_proj_weight.shape[1]
        for t in self.lora_targets:
            i = QKV.index(t)
            self.in_proj_weight[i * D:(i + 1) * D] += sign * self.delta_weight(t).to(
                self.in_proj_weight.dtype)
        self.lora_merged = sign > 0


LORA_TYPES = (LoRALinear, LoRAAttention)


def _check_targets(targets) -> tuple:
    unknown = [t for t in targets if t not in TARGETS]
    if unknown or not targets:
        raise ValueError(f"LoRA targets must be a non-empty subset of {TARGETS}, got {targets}")
    return tuple(t for t in TARGETS if t in targets)  # canonical order


def add_lora(module: nn.Module, r: int = 16, alpha: float = 32, dropout: float = 0.1,
             targets=("q", "k", "v", "o"), scaling: str = "rslora") -> nn.Module:
    """Add LoRA to every attention block inside `module` (e.g. `model.visual`), in place.

    targets: any of "q", "k", "v" (slices of the packed in_proj), "o" (out_proj) and "mlp"
    (c_fc and c_proj). Base weights are not frozen here: call mark_only_trainable for that.
    """
    targets = _check_targets(targets)
    lora_scaling(r, alpha, scaling)  # validate before touching the model
    if any(isinstance(m, LORA_TYPES) for m in module.modules()):
        raise ValueError("this module already has LoRA; call merge_lora(model, remove=True) "
                         "before adding LoRA again")
    kw = dict(r=r, alpha=alpha, dropout=dropout, scaling=scaling)
    attns = [m for m in module.modules() if isinstance(m, Attention)]
    mlps = [m for m in module.modules() if isinstance(m, MLP)] if "mlp" in targets else []
    if not attns:
        raise ValueError(f"add_lora found no clip_us Attention inside {type(module).__name__}")
    for attn in attns:
        if "o" in targets:
            attn.out_proj = LoRALinear(attn.out_proj, **kw)
    for mlp in mlps:
        mlp.c_fc, mlp.c_proj = LoRALinear(mlp.c_fc, **kw), LoRALinear(mlp.c_proj, **kw)
    if any(t in QKV for t in targets):
        _replace(module, Attention, lambda a: LoRAAttention(a, targets=targets, **kw))
    return module


def _replace(module: nn.Module, kind: type, make) -> None:
    """Swap every child of type `kind` (anywhere inside `module`) for make(child)."""
    found = [(parent, name, child) for parent in module.modules()
             for name, child in parent.named_children() if isinstance(child, kind)]
    for parent, name, child in found:
        setattr(parent, name, make(child))


def lora_settings(module: nn.Module) -> dict | None:
    """The LoRA settings found in `module` (r, alpha, scaling, dropout, targets), or None."""
    layers = [(n, m) for n, m in module.named_modules() if isinstance(m, LORA_TYPES)]
    if not layers:
        return None
    targets = set()
    for name, m in layers:
        if isinstance(m, LoRAAttention):
            targets.update(m.lora_targets)
        else:
            targets.add("o" if name.endswith("out_proj") else "mlp")
    m = layers[0][1]
    return {"r": m.lora_r, "alpha": m.lora_alpha, "scaling": m.lora_scaling_kind,
            "dropout": m.lora_dropout.p, "targets": tuple(t for t in TARGETS if t in targets)}


def merge_lora(model: nn.Module, remove: bool = False) -> nn.Module:
    """Fold every LoRA delta into its base weight (eval-time speed; dropout no longer applies).

    Already merged layers are left alone. With remove=True the LoRA layers become plain
    Attention / nn.Linear again, so the state dict loads into a plain `build_model`.
    """
    for m in model.modules():
        if isinstance(m, LORA_TYPES) and not m.lora_merged:
            m.merge(+1.0)
    if remove:
        _replace(model, LoRAAttention, lambda a: _plain(Attention, a))
        _replace(model, LoRALinear, lambda lin: _plain(nn.Linear, lin))
    return model


def _plain(cls: type, lora_module: nn.Module) -> nn.Module:
    plain = cls.__new__(cls)  # no __init__: it would allocate weights we are about to replace
    _adopt(plain, lora_module)
    return plain


def unmerge_lora(model: nn.Module) -> nn.Module:
    """Take merged deltas back out of the base weights (inverse of merge_lora without remove)."""
    for m in model.modules():
        if isinstance(m, LORA_TYPES) and m.lora_merged:
            m.merge(-1.0)
    return model


def mark_only_trainable(model: nn.Module, patterns=("lora_",)) -> nn.Module:
    """requires_grad only for parameters whose name contains one of `patterns`; freeze the rest.

    The default keeps LoRA's tensors trainable; add your own patterns for a head, e.g.
    `mark_only_trainable(model, ("lora_", "classifier."))`.
    """
    named = list(model.named_parameters())
    for name, p in named:
        p.requires_grad_(any(pat in name for pat in patterns))
    if not any(p.requires_grad for _, p in named):
        raise ValueError(f"no parameter name contains any of {patterns}: add adapters "
                         f"(add_lora) or a head before freezing the rest")
    return model


def lora_state_dict(model: nn.Module) -> dict:
    """Only the LoRA tensors of model.state_dict(), keys unchanged."""
    return {k: v for k, v in model.state_dict().items() if "lora_" in k}
