"""Training losses: Dice-CE and focal (the supervised heads: §3.3 of Qu et al., "Adapting
Vision-Language Foundation Model for Next Generation Medical Ultrasound Image Analysis", as
NextGen-UIA's MONAI losses compute them) and the symmetric InfoNCE contrastive loss of CLIP
(DDP-aware, following open_clip's gathering).

Stand-alone: torch only, nothing else from clip_us, so the file can be copied.

- ``dice_ce_loss`` == ``monai.losses.DiceCELoss(to_onehot_y=True, softmax=True, squared_pred=True,
  smooth_nr=1e-8, smooth_dr=1e-8)``: Dice over softmax probabilities (per image and class, then
  averaged, background included) + cross-entropy, equal weights.
- ``focal_loss`` == ``monai.losses.FocalLoss(to_onehot_y=True)``: sigmoid per class on one-hot
  targets, gamma 2, no alpha, mean over every element; ``use_softmax=True`` is MONAI's
  ``use_softmax=True`` variant.
- ``clip_loss``: symmetric cross-entropy over the global batch's cosine logits.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F


def _one_hot(logits: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Class indices [B, *spatial] and their one-hot [B, C, *spatial] (float, like logits).

    Accepts target [B, 1, *spatial] (MONAI's layout) or [B, *spatial]; float targets must hold
    integer class indices.
    """
    if target.ndim == logits.ndim and target.shape[1] == 1:
        target = target.squeeze(1)  # [B, 1, *S] -> [B, *S]
    if target.shape != logits.shape[:1] + logits.shape[2:]:
        raise ValueError(f"losses: target must be [B, 1, *spatial] or [B, *spatial] class indices for "
                         f"logits {tuple(logits.shape)}, got {tuple(target.shape)}.")
    index = target.long()
    hot = F.one_hot(index, logits.shape[1]).movedim(-1, 1).to(logits.dtype)  # [B, *S, C] -> [B, C, *S]
    return index, hot


def dice_ce_loss(logits: torch.Tensor, target: torch.Tensor, smooth_nr: float = 1e-8,
                 smooth_dr: float = 1e-8) -> torch.Tensor:
    """Soft Dice (squared denominators) + cross-entropy. logits [B, C, *spatial], target class
    indices [B, 1, *spatial] or [B, *spatial]."""
    index, hot = _one_hot(logits, target)
    prob = logits.softmax(1)
    dims = tuple(range(2, logits.ndim))  # per image and class, as MONAI's batch=False
    inter = (prob * hot).sum(dims)
    denom = (hot * hot).sum(dims) + (prob * prob).sum(dims)  # squared_pred=True
    dice = 1.0 - (2.0 * inter + smooth_nr) / (denom + smooth_dr)
    return dice.mean() + F.cross_entropy(logits, index)


def focal_loss(logits: torch.Tensor, target: torch.Tensor, gamma: float = 2.0, alpha: float | None = None,
               use_softmax: bool = False) -> torch.Tensor:
    """Focal loss, mean over all elements. logits [B, C, *spatial] (or [B, C] for classification),
    target [B, 1, *spatial] / [B, *spatial] class indices.

    Sigmoid (default, MONAI's): every class is an independent binary problem on the one-hot target,
    FL = -(1 - p_t)^gamma log p_t, with alpha (if given) weighting positives by alpha and negatives
    by 1 - alpha. Softmax: FL = -(1 - p_c)^gamma log p_c on the true class, alpha (if given) weighting
    class 0 by 1 - alpha and the others by alpha — both exactly as MONAI.
    """
    _, hot = _one_hot(logits, target)
    if use_softmax:
        log_p = logits.log_softmax(1)
        loss = -(1 - log_p.exp()).pow(gamma) * log_p * hot
        if alpha is not None:
            weight = torch.full((logits.shape[1],), alpha, dtype=logits.dtype, device=logits.device)
            weight[0] = 1 - alpha
            loss = loss * weight.view(1, -1, *([1] * (logits.ndim - 2)))  # [C] -> [1, C, 1, ...]
        return loss.mean()
    bce = F.binary_cross_entropy_with_logits(logits, hot, reduction="none")
    # (1 - p_t)^gamma computed as exp(gamma * log sigmoid(-x·(2t-1))), stable for large |x|
    loss = (gamma * F.logsigmoid(-logits * (2 * hot - 1))).exp() * bce
    if alpha is not None:
        loss = loss * (hot * alpha + (1 - hot) * (1 - alpha))
    return loss.mean()


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; multiplies the incoming gradient by `factor`."""

    @staticmethod
    def forward(ctx, x, factor):
        ctx.factor = factor
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.factor, None


def _gather(x: torch.Tensor) -> torch.Tensor:
    """[B, D] per rank -> [world·B, D] in rank order. Other ranks' rows carry no gradient; the local
    rows are the local tensor itself, with its gradient scaled by the world size (see clip_loss)."""
    world, rank = dist.get_world_size(), dist.get_rank()
    parts = [torch.empty_like(x) for _ in range(world)]
    with torch.no_grad():
        dist.all_gather(parts, x.contiguous())
    parts[rank] = _ScaleGrad.apply(x, float(world))
    return torch.cat(parts, 0)


def clip_loss(img_emb: torch.Tensor, txt_emb: torch.Tensor, logit_scale,
              gather: bool = True) -> torch.Tensor:
    """Symmetric InfoNCE: mean of image→text and text→image cross-entropy over the cosine logits.

    img_emb, txt_emb: [B, D], already L2-normalised, row i of one paired with row i of the other.
    logit_scale: the multiplier itself (``1 / 0.07`` for the fixed temperature, or
    ``model.logit_scale.exp()`` when learnable); a float or a tensor.

    Under ``torch.distributed`` (every rank with the same B), features are gathered from all ranks
    without gradient and the local tensor is put back in its slot, as open_clip does, and the loss
    is computed on the global batch. Each rank's backward then reaches only its own rows, and DDP
    averages over ranks, which would give 1/world of the true gradient; so the gradient of the
    local rows is multiplied by the world size. We scale that gradient rather than the loss so the
    returned value is the global-batch loss and a learnable logit_scale (whose gradient each rank
    already has in full) is not scaled too. N ranks × B then equal one process with N·B, in loss
    and in every parameter gradient. ``gather=False`` computes the loss of the given rows only,
    also under DDP (e.g. on embeddings already gathered for validation).
    """
    if img_emb.ndim != 2 or img_emb.shape != txt_emb.shape:
        raise ValueError(f"clip_loss: img_emb and txt_emb must both be [B, D], got "
                         f"{tuple(img_emb.shape)} and {tuple(txt_emb.shape)}.")
    if gather and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        img_emb, txt_emb = _gather(img_emb), _gather(txt_emb)
    logits = logit_scale * img_emb @ txt_emb.t()  # [N, N], row = image, column = text
    labels = torch.arange(logits.shape[0], device=logits.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels)) / 2
