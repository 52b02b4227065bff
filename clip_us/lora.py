"""LoRA for packed attention projections (and any nn.Linear), with merging and freezing.

LoRA (Hu et al., 2022) adds a low-rank update to a frozen weight: W x + s * B (A dropout(x)), with
A [r, in] kaiming-uniform(a=sqrt(5)) and B [out, r] zeros, so a fresh adapter changes nothing.
The ultrasound-CLIP paper (Qu et al., "Adapting Vision-Language Foundation Model for Next
Generation Medical Ultrasound Image Analysis") §3.1 puts it on the q, k, v and output projections of
every vision block, r=16, alpha=32, dropout 0.1.

- Scaling: "rslora" gives s = alpha / sqrt(r), what the official code (jinggqu/NextGen-UIA) does,
  and is the default. "standard" gives classic LoRA's s = alpha / r.
- q, k and v live in one packed `in_proj_weight` [3D, D] (rows q, k, v), as in OpenAI's
  checkpoints and torch's nn.MultiheadAttention. `LoRAAttention` adds each targeted delta to its
  slice of the packed projection instead of splitting the weight, so every key keeps its name.
  Each target has its own A, B and dropout draw, as the official code's separate q/k/v layers do;
  on the CPU the draw comes from `keep_mask` (the same Bernoulli distribution, about 2x faster than
  nn.Dropout's bernoulli_).
  `shared_dropout=True` draws one mask for q, k and v instead (a third of the random numbers, one
  stacked A matmul; each target's marginal distribution is unchanged, but the three masks are
  equal instead of independent).
- Any module with a packed `in_proj_weight` and an `out_proj` nn.Linear is an attention block:
  one that computes q/k/v through an `in_proj(x)` method (clip_us's CLIP) gets that method
  overridden; torch's nn.MultiheadAttention gets a forward that computes the same attention with
  the LoRA'd projections. A block passed to add_lora itself (a bare nn.MultiheadAttention) comes
  back as a new module: `attn = add_lora(attn)`. "mlp" targets the `c_fc`/`c_proj` nn.Linear
  pair of OpenAI's blocks; `LoRALinear(layer)` wraps any other nn.Linear.
- LoRA tensors are new keys containing "lora_" (`attn.lora_A_q`, `attn.out_proj.lora_B`, ...).

This file imports only torch, so it can be copied into another project on its own.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

QKV = ("q", "k", "v")
TARGETS = ("q", "k", "v", "o", "mlp")
DEFAULT_TARGETS = ("q", "k", "v", "o")  # the ultrasound-CLIP paper's: every attention projection


def lora_scaling(r: int, alpha: float, scaling: str) -> float:
    """s = alpha/sqrt(r) for "rslora" (the official code, our default), alpha/r for "standard"."""
    if scaling == "rslora":
        return alpha / math.sqrt(r)
    if scaling == "standard":
        return alpha / r
    raise ValueError(f"LoRA scaling must be 'rslora' or 'standard', got {scaling!r}")


def keep_mask(shape, p: float, device="cpu") -> torch.Tensor:
    """A bool mask, each element independently False with probability p: dropout's Bernoulli
    draw, about 2x faster than bernoulli_ on the CPU.

    Each element gets 32 random bits u, cut two per int64 word of torch.randint (bernoulli_ and
    torch.rand spend a generator call per element), and is dropped when u < p * 2^32: a drop
    probability within 2^-33 of p, finer than torch.rand's 2^-24 steps."""
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"dropout probability must be in [0, 1], got {p}")
    cut = round(p * 2**32) - 2**31  # on the int32 scale of u below
    if cut > 2**31 - 1:  # p within 2^-33 of 1: every element dropped (and no int32 overflow)
        return torch.zeros(shape, dtype=torch.bool, device=device)
    n = math.prod(shape)
    words = torch.randint(-2**63, 2**63 - 1, (-(-n // 2),), dtype=torch.int64, device=device)
    u = words.view(torch.int32)[:n]  # uniform on [-2^31, 2^31) (to ~2^-64: randint's open end)
    return (u >= cut).view(shape)


def dropout_linear(x: torch.Tensor, weight: torch.Tensor, dropout: nn.Dropout) -> torch.Tensor:
    """F.linear(dropout(x), weight) for LoRA's A: on the CPU in training, the mask comes from
    keep_mask and 1/(1-p) scales the rank-r result instead of x (the same value; autograd keeps a
    bool mask instead of a float one). Elsewhere (CUDA's fused dropout, eval, p in {0, 1}) it is
    nn.Dropout itself."""
    p = dropout.p
    if not dropout.training or p in (0.0, 1.0) or x.device.type != "cpu":
        return F.linear(dropout(x), weight)
    kept = torch.where(keep_mask(x.shape, p, x.device), x, 0.0)
    return F.linear(kept, weight) * (1.0 / (1.0 - p))


def _adopt(new: nn.Module, base: nn.Module) -> None:
    """Make `new` hold `base`'s parameters, buffers, submodules and plain attributes (the same
    objects, so no copy and no renamed key). Names starting with "lora_" are LoRA's own: skipped,
    which is also how merge_lora(remove=True) turns a LoRA module back into a plain one."""
    nn.Module.__init__(new)
    internals = set(vars(new)) - {"training"}  # nn.Module's own bookkeeping, fresh in `new`
    for store in ("_parameters", "_buffers", "_modules"):
        getattr(new, store).update({k: v for k, v in getattr(base, store).items()
                                    if not k.startswith("lora_")})
    new.__dict__.update({k: v for k, v in vars(base).items()
                         if k not in internals and not k.startswith("lora_")})


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
        self.lora_dropout = nn.Dropout(dropout).train(self.training)
        self.lora_A, self.lora_B = _lora_pair(self.out_features, self.in_features, r, self.weight)

    def delta_weight(self) -> torch.Tensor:
        return self.lora_scaling * self.lora_B @ self.lora_A  # [out, in]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, self.weight, self.bias)
        if self.lora_merged:  # the delta is inside `weight` already
            return out
        # Scale the rank-r tensor, not the [..., out] one: same result, far less memory traffic.
        low = dropout_linear(x, self.lora_A, self.lora_dropout) * self.lora_scaling  # [..., r]
        return out + F.linear(low, self.lora_B)

    @torch.no_grad()
    def merge(self, sign: float = 1.0) -> None:
        self.weight += sign * self.delta_weight().to(self.weight.dtype)
        self.lora_merged = sign > 0


def _attention_bias(attn_mask, key_padding_mask, is_causal, shape, like) -> torch.Tensor:
    """nn.MultiheadAttention's masks as one additive bias [B, H, L, S]: a True (bool) entry is
    a position not attended to; float masks are added as they are."""
    B, H, L, S = shape
    if attn_mask is None and is_causal:
        attn_mask = torch.ones(L, S, dtype=torch.bool, device=like.device).triu(1)
    bias = like.new_zeros(shape)
    for mask, view in ((attn_mask, (-1, H, L, S) if attn_mask is not None and attn_mask.dim() == 3
                        else (1, 1, L, S)), (key_padding_mask, (B, 1, 1, S))):
        if mask is not None:
            mask = mask.reshape(view)  # [L, S] | [B*H, L, S] | [B, S] -> broadcastable to bias
            bias = bias + (like.new_zeros(mask.shape).masked_fill(mask, -math.inf)
                           if mask.dtype == torch.bool else mask.to(like.dtype))
    return bias


class LoRAAttention(nn.Module):
    """An attention block whose packed q/k/v projection carries LoRA deltas on the targeted
    slices. Built by `lora_attention(base, ...)`, as a subclass of the base's own class."""

    def _setup(self, base: nn.Module, r: int, alpha: float, dropout: float, targets,
               scaling: str, shared_dropout: bool = False):
        _adopt(self, base)
        targets = tuple(t for t in QKV if t in targets)  # canonical q, k, v order
        if r < 1:
            raise ValueError(f"LoRA rank r must be >= 1, got {r}")
        self.lora_r, self.lora_alpha, self.lora_scaling_kind = r, alpha, scaling
        self.lora_scaling = lora_scaling(r, alpha, scaling)
        self.lora_targets, self.lora_merged = targets, False
        self.lora_shared_dropout = shared_dropout
        self.lora_dropout = nn.Dropout(dropout).train(self.training)
        width = self.in_proj_weight.shape[1]
        for t in targets:
            A, B = _lora_pair(width, width, r, self.in_proj_weight)
            setattr(self, f"lora_A_{t}", A)
            setattr(self, f"lora_B_{t}", B)

    def delta_weight(self, t: str) -> torch.Tensor:
        return self.lora_scaling * getattr(self, f"lora_B_{t}") @ getattr(self, f"lora_A_{t}")

    def _lora(self, x: torch.Tensor, t: str) -> torch.Tensor:
        low = dropout_linear(x, getattr(self, f"lora_A_{t}"), self.lora_dropout)  # [..., r]
        return F.linear(low * self.lora_scaling, getattr(self, f"lora_B_{t}"))  # [..., D]

    def _low(self, x: torch.Tensor) -> torch.Tensor:
        """[..., n*r]: s * A_t dropout(x) of every target t, side by side. By default each target
        draws its own dropout mask, as the official code's separate q/k/v layers do. With
        shared_dropout=True they share ONE draw: each target still sees x under a Bernoulli(1-p)
        mask, but the same one, so their dropped features coincide; one draw and one matmul with
        the stacked A's replace three of each."""
        A = [getattr(self, f"lora_A_{t}") for t in self.lora_targets]
        if self.lora_shared_dropout:
            low = dropout_linear(x, torch.cat(A), self.lora_dropout)  # A's stacked: [n*r, D]
        else:
            low = torch.cat([dropout_linear(x, a, self.lora_dropout) for a in A], dim=-1)
        return low * self.lora_scaling

    def _B_blocks(self) -> torch.Tensor:
        """[3D, n*r]: each target's B in its own rows (q, k or v) and its own r columns, zeros
        elsewhere, so that one matmul adds every delta to its slice of the packed projection."""
        none = self.in_proj_weight.new_zeros(self.in_proj_weight.shape[1], 0)  # [D, 0]
        return torch.block_diag(*[getattr(self, f"lora_B_{t}") if t in self.lora_targets
                                  else none for t in QKV])

    def in_proj(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, self.in_proj_weight, self.in_proj_bias)  # [..., 3D], q | k | v
        if self.lora_merged or not self.lora_targets:
            return out
        low = self._low(x)  # [..., n*r]
        # out + low @ blocks^T in one addmm (fused add, no per-target [..., D] tensors):
        # [..., 3D] -> [M, 3D] and [..., n*r] -> [M, n*r], back to [..., 3D]
        flat = torch.addmm(out.reshape(-1, out.shape[-1]), low.reshape(-1, low.shape[-1]),
                           self._B_blocks().t())
        return flat.view(out.shape)

    def proj_slice(self, x: torch.Tensor, i: int) -> torch.Tensor:
        """q (i=0), k (1) or v (2) of `x` alone, LoRA included: for distinct query/key/value."""
        D = self.in_proj_weight.shape[1]
        bias = None if self.in_proj_bias is None else self.in_proj_bias[i * D:(i + 1) * D]
        out = F.linear(x, self.in_proj_weight[i * D:(i + 1) * D], bias)  # [..., D]
        t = QKV[i]
        return out if self.lora_merged or t not in self.lora_targets else out + self._lora(x, t)

    def mha_forward(self, query, key, value, key_padding_mask=None, need_weights=True,
                    attn_mask=None, average_attn_weights=True, is_causal=False):
        """nn.MultiheadAttention.forward's contract, computed with the LoRA'd projections."""
        if self.bias_k is not None or self.add_zero_attn:
            raise NotImplementedError("LoRA on nn.MultiheadAttention supports neither "
                                      "add_bias_kv nor add_zero_attn")
        batched = query.dim() == 3
        seq_dim = 1 if self.batch_first else 0
        if not batched:  # [L, D] -> [1, L, D] (batch_first) or [L, 1, D]
            query, key, value = (t.unsqueeze(1 - seq_dim) for t in (query, key, value))
            key_padding_mask = None if key_padding_mask is None else key_padding_mask[None]
        if not self.batch_first:  # [L, B, D] -> [B, L, D]
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        if query is key and key is value:
            q, k, v = self.in_proj(query).chunk(3, dim=-1)  # 3 x [B, L, D]
        else:
            q, k, v = (self.proj_slice(t, i) for i, t in enumerate((query, key, value)))
        B, L, D = q.shape
        S, H = k.shape[1], self.num_heads
        q, k, v = (t.reshape(B, -1, H, D // H).transpose(1, 2) for t in (q, k, v))  # [B, H, *, hd]
        scores = q @ k.transpose(-2, -1) / math.sqrt(D // H)  # [B, H, L, S]
        scores = scores + _attention_bias(attn_mask, key_padding_mask, is_causal, (B, H, L, S), q)
        weights = F.dropout(scores.softmax(-1), self.dropout, self.training)
        out = self.out_proj((weights @ v).transpose(1, 2).reshape(B, L, D))  # [B, L, D]
        if not self.batch_first:
            out = out.transpose(0, 1)  # [B, L, D] -> [L, B, D]
        if need_weights:
            weights = weights.mean(1) if average_attn_weights else weights
        if not batched:
            out = out.squeeze(1 - seq_dim)
            weights = weights.squeeze(0) if need_weights else None
        return out, (weights if need_weights else None)

    @torch.no_grad()
    def merge(self, sign: float = 1.0) -> None:
        D = self.in_proj_weight.shape[1]
        for t in self.lora_targets:
            i = QKV.index(t)
            self.in_proj_weight[i * D:(i + 1) * D] += sign * self.delta_weight(t).to(
                self.in_proj_weight.dtype)
        self.lora_merged = sign > 0


_LORA_CLASSES: dict[type, type] = {}


def _no_fused_path(module, args):
    """A no-op forward pre-hook. Its presence turns off nn.TransformerEncoderLayer's fused
    inference path, which reads in_proj_weight directly and would skip LoRA."""
    return None


def lora_attention(base: nn.Module, r: int = 16, alpha: float = 32, dropout: float = 0.1,
                   targets=QKV, scaling: str = "rslora",
                   shared_dropout: bool = False) -> LoRAAttention:
    """`base` (same parameter objects, same keys) as an instance of LoRA<base class>."""
    kind = type(base)
    if kind not in _LORA_CLASSES:
        body = {"lora_base": kind, "__module__": __name__}
        if isinstance(base, nn.MultiheadAttention):
            body["forward"] = LoRAAttention.mha_forward  # its own forward ignores in_proj
        name = f"LoRA{kind.__name__}"
        _LORA_CLASSES[kind] = globals()[name] = type(name, (LoRAAttention, kind), body)
    new = _LORA_CLASSES[kind].__new__(_LORA_CLASSES[kind])
    new._setup(base, r, alpha, dropout, targets, scaling, shared_dropout)
    if isinstance(base, nn.MultiheadAttention):
        new.register_forward_pre_hook(_no_fused_path)
    return new


def is_packed_attention(m: nn.Module) -> bool:
    """An attention block with a packed q/k/v projection and an out_proj nn.Linear."""
    return isinstance(getattr(m, "in_proj_weight", None), torch.Tensor) and \
        isinstance(getattr(m, "out_proj", None), nn.Linear)


LORA_TYPES = (LoRALinear, LoRAAttention)


def _check_targets(targets) -> tuple:
    unknown = [t for t in targets if t not in TARGETS]
    if unknown or not targets:
        raise ValueError(f"LoRA targets must be a non-empty subset of {TARGETS}, got {targets}")
    return tuple(t for t in TARGETS if t in targets)  # canonical order


def add_lora(module: nn.Module, r: int = 16, alpha: float = 32, dropout: float = 0.1,
             targets=DEFAULT_TARGETS, scaling: str = "rslora",
             shared_dropout: bool = False) -> nn.Module:
    """Add LoRA to every attention block inside `module` (e.g. `model.visual`); returns the module.

    targets: any of "q", "k", "v" (slices of the packed in_proj), "o" (out_proj) and "mlp"
    (c_fc and c_proj). Base weights are not frozen here: call mark_only_trainable for that.
    shared_dropout: q, k and v share one dropout draw per block (faster; the official code
    draws one per target, the default).

    Blocks inside `module` are replaced in place. An attention block passed itself (e.g. a bare
    nn.MultiheadAttention) cannot replace itself in its parent: a new block holding the same
    parameter objects is returned and `module` is left as it was, so write
    `attn = add_lora(attn)`.
    """
    targets = _check_targets(targets)
    lora_scaling(r, alpha, scaling)  # validate before touching the model
    if any(isinstance(m, LORA_TYPES) for m in module.modules()):
        raise ValueError("this module already has LoRA; call merge_lora(model, remove=True) "
                         "before adding LoRA again")
    kw = dict(r=r, alpha=alpha, dropout=dropout, scaling=scaling)
    if is_packed_attention(module):  # the new block's out_proj below is its own, not module's
        module = lora_attention(module, targets=targets, shared_dropout=shared_dropout, **kw)
    attns = [m for m in module.modules() if is_packed_attention(m)]
    mlps = [m for m in module.modules() if isinstance(getattr(m, "c_fc", None), nn.Linear)
            and isinstance(getattr(m, "c_proj", None), nn.Linear)] if "mlp" in targets else []
    if not attns:
        raise ValueError(f"add_lora found no attention block (a module with a packed "
                         f"in_proj_weight and an out_proj nn.Linear) inside {type(module).__name__}")
    for attn in attns:
        if "o" in targets:
            attn.out_proj = LoRALinear(attn.out_proj, **kw)
    for mlp in mlps:
        mlp.c_fc, mlp.c_proj = LoRALinear(mlp.c_fc, **kw), LoRALinear(mlp.c_proj, **kw)
    # torch's nn.MultiheadAttention never calls out_proj as a module: it needs LoRA's forward
    # even when only "o" is targeted.
    wrap = {id(a) for a in attns if any(t in QKV for t in targets)
            or isinstance(a, nn.MultiheadAttention)}
    _replace(module, lambda m: id(m) in wrap,
             lambda a: lora_attention(a, targets=targets, shared_dropout=shared_dropout, **kw))
    return module


def _replace(module: nn.Module, chosen, make) -> None:
    """Swap every child for which chosen(child) holds (anywhere inside `module`) for make(child)."""
    found = [(parent, name, child) for parent in module.modules()
             for name, child in parent.named_children() if chosen(child)]
    for parent, name, child in found:
        setattr(parent, name, make(child))


def lora_settings(module: nn.Module) -> dict | None:
    """The LoRA settings found in `module` (r, alpha, scaling, dropout, targets, shared_dropout),
    or None."""
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
    shared = any(getattr(a, "lora_shared_dropout", False) for _, a in layers)
    return {"r": m.lora_r, "alpha": m.lora_alpha, "scaling": m.lora_scaling_kind,
            "dropout": m.lora_dropout.p, "targets": tuple(t for t in TARGETS if t in targets),
            "shared_dropout": shared}


def merge_lora(model: nn.Module, remove: bool = False) -> nn.Module:
    """Fold every LoRA delta into its base weight (eval-time speed; dropout no longer applies).

    Already merged layers are left alone. With remove=True the LoRA layers become their plain
    classes again (the attention's own class, nn.Linear), so the state dict loads into the
    model without LoRA; a LoRA layer passed itself is returned as a new plain module (as
    add_lora returns a bare attention block), so write `attn = merge_lora(attn, remove=True)`.
    """
    for m in model.modules():
        if isinstance(m, LORA_TYPES) and not m.lora_merged:
            m.merge(+1.0)
    if not remove:
        return model
    # attention blocks first: their plain copies hold the LoRALinear out_proj that pass 2 swaps
    _replace(model, lambda m: isinstance(m, LoRAAttention), _plain)
    _replace(model, lambda m: isinstance(m, LoRALinear), _plain)
    return _plain(model) if isinstance(model, LORA_TYPES) else model


def _plain(lora_module: nn.Module) -> nn.Module:
    """A LoRA layer as its plain class (the attention's own class, nn.Linear), same parameters."""
    cls = lora_module.lora_base if isinstance(lora_module, LoRAAttention) else nn.Linear
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
