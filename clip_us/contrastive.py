"""Contrastive fine-tuning of CLIP on image–caption pairs: the data set, which parameters each
`--train` mode trains, the model wrapper that DDP sees, and the validation pass.

The ultrasound-CLIP paper (Qu et al., "Adapting Vision-Language Foundation Model for Next
Generation Medical Ultrasound Image Analysis") §3.1 (Fig. 1a), as its official code runs it
(NextGen-UIA `src/models/clip/finetune.py`): CLIP frozen, the adapter in the vision tower trains;
symmetric InfoNCE on L2-normalised embeddings with the temperature fixed at 0.07; images
bicubic-resized to 224 and centre-cropped; captions tokenised to 77 tokens with truncation.
EchoCare-CLIP ("Ultrasound Vision-Language Alignment via Contrastive Learning") instead trains the
projection heads and the temperature, optionally with one or both towers; `--train heads|image|
text|full` does that in CLIP's own embedding space, with CLIP's logit scale as the learnable
temperature (capped at 100, as CLIP's training did).

Validation follows both papers: the InfoNCE loss over batches of the training batch size (the
official code's validation loader), retrieval R@1/5/10 and mean rank both ways, strict and with
identical captions interchangeable (metrics.strict_retrieval and metrics.dup_retrieval: the same
keys and numbers as evaluate.py), and EchoCare-CLIP's paired / cross alignment scores and their gap.
"""
from __future__ import annotations

import functools
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import Dataset

from . import metrics
from .adapters import ADAPTER_KEYS
from .lora import mark_only_trainable
from .losses import clip_loss
from .model import CLIP
from .precision import inference
from .tokenizer import tokenize
from .transform import Preprocess, mean_std

__all__ = ["TRAIN_MODES", "CaptionDataset", "caption_dataset", "ContrastiveCLIP", "set_trainable",
           "trainable_names", "validate", "MAX_LOGIT_SCALE"]

TRAIN_MODES = ("adapter", "heads", "image", "text", "full")
HEADS = ("visual.proj", "text_projection", "logit_scale")
TEXT_TOWER = ("transformer.", "token_embedding.", "positional_embedding", "ln_final.")
MAX_LOGIT_SCALE = 100.0  # CLIP clamps exp(logit_scale) at 100


# ----------------------------------------------------------------------------- data
class CaptionDataset(Dataset):
    """Image-caption pairs (clip_us.captions.manifest.Pair: .image, .caption, .key) -> dict(image
    = transform(image file), text = the caption's tokens, caption, key, index); with no
    `tokenize`, images alone (no "text"). One class for every model: CLIP passes OpenAI's
    preprocessing and its tokenizer (caption_dataset below), EchoCare-CLIP the authors'
    pipelines and its own tokenizer (echocare.data.caption_dataset), evaluate.py an encoder's
    preprocessing. Captions are tokenised once, here."""

    def __init__(self, pairs, transform, tokenize=None):
        self.pairs, self.transform = list(pairs), transform
        self.tokens = tokenize([p.caption for p in self.pairs]) if tokenize and self.pairs else None

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i: int) -> dict:
        p = self.pairs[i]
        item = {"image": self.transform(p.image), "caption": p.caption, "key": p.key, "index": i}
        return item if self.tokens is None else {**item, "text": self.tokens[i]}


def caption_dataset(pairs, size: int = 224, clip_norm: bool = True,
                    context_length: int = 77) -> CaptionDataset:
    """manifest.Pair list -> CaptionDataset of dict(image [3, S, S], text [77] token ids, ...).

    Images: bicubic resize of the shortest side to S, centre crop (OpenAI's preprocessing, which
    the official fine-tuning uses), then CLIP's mean/std, or plain [0, 1] pixels with
    ``clip_norm=False`` as the official fine-tuning fed them. Captions: CLIP's tokenizer,
    truncated to the context with the end-of-text token kept last.
    """
    return CaptionDataset(pairs, Preprocess(size, *mean_std(clip_norm)),
                          functools.partial(tokenize, context_length=context_length, truncate=True))


# ----------------------------------------------------------------------------- what trains
def _is_head(name: str) -> bool:
    return name in HEADS or name.startswith("visual.proj")  # visual.proj and visual.proj_bias


def _trains(name: str, mode: str) -> bool:
    if mode == "full":
        return True
    if mode == "image" and name.startswith("visual."):
        return True
    if mode == "text" and name.startswith(TEXT_TOWER):
        return True
    return _is_head(name)


def set_trainable(clip: nn.Module, mode: str, learn_temperature: bool) -> list[str]:
    """Set requires_grad on a CLIP for a `--train` mode; returns the trainable names.

    adapter: only LoRA / Mona tensors (the backbone, heads and temperature stay frozen).
    heads:   visual.proj, text_projection and logit_scale; image: + the vision tower;
    text:    + the text tower; full: everything. logit_scale trains only when
    ``learn_temperature`` (not with a fixed --temperature).
    """
    if mode not in TRAIN_MODES:
        raise ValueError(f"--train must be one of {TRAIN_MODES}, got {mode!r}")
    if mode == "adapter":
        mark_only_trainable(clip, ADAPTER_KEYS)
    else:
        for name, p in clip.named_parameters():
            p.requires_grad_(_trains(name, mode))
    clip.logit_scale.requires_grad_(learn_temperature and mode != "adapter")
    return trainable_names(clip)


def trainable_names(module: nn.Module) -> list[str]:
    return [n for n, p in module.named_parameters() if p.requires_grad]


# ----------------------------------------------------------------------------- the model DDP wraps
class ContrastiveCLIP(CLIP):
    """The same CLIP (the same tensor objects, OpenAI key names) whose forward returns
    (image embeddings, text embeddings, logit scale), both L2-normalised: what DDP wraps, and
    what a checkpoint saves, so its keys are a CLIP's and `--init` reads them anywhere.

    ``temperature`` > 0 fixes the scale at 1/temperature; 0 uses exp(logit_scale), capped at
    MAX_LOGIT_SCALE. The text tower runs without autograd when none of its weights train
    (the adapter and image modes), which saves its activations.
    """

    def __init__(self, clip: CLIP, temperature: float = 0.07):
        nn.Module.__init__(self)  # not CLIP's: that would build fresh weights
        vars(self).update(vars(clip))  # share clip's parameters, submodules and settings
        self.temperature = temperature

    def scale(self) -> torch.Tensor:
        if self.temperature > 0:
            return torch.tensor(1.0 / self.temperature, device=self.logit_scale.device)
        return self.logit_scale.exp().clamp(max=MAX_LOGIT_SCALE)

    def text_trains(self) -> bool:
        return self.text_projection.requires_grad or any(
            p.requires_grad for p in self.transformer.parameters())

    def forward(self, image: torch.Tensor, text: torch.Tensor):
        img = F.normalize(self.encode_image(image), dim=-1)  # [B, D]
        # The text tower is causal and pools at the end-of-text token (the largest id), so the
        # padding after the batch's last EOT changes nothing: cut it (captions are ~30 of 77).
        text = text[:, :int(text.argmax(dim=-1).max()) + 1]  # [B, 77] -> [B, L]
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.text_trains()):
            txt = F.normalize(self.encode_text(text), dim=-1)  # [B, D]
        return img, txt, self.scale()


# ----------------------------------------------------------------------------- validation
def embed(model, loader, device, precision: str = "fp32") -> tuple[list, torch.Tensor,
                                                                    torch.Tensor]:
    """(indices, image embeddings [N, D], text embeddings [N, D]) of one loader, returned in fp32;
    computed under `precision` (an already resolved --precision: clip_us/precision.py)."""
    model.eval()
    idx, imgs, txts = [], [], []
    for batch in loader:
        with inference(model, precision, device):
            img, txt, _ = model(batch["image"].to(device), batch["text"].to(device))
        idx += batch["index"].tolist()
        # normalised again in fp32: under bf16 a unit vector's norm is only within ~1e-2 of 1
        imgs.append(F.normalize(img.float(), dim=-1).cpu())
        txts.append(F.normalize(txt.float(), dim=-1).cpu())
    cat = (lambda xs: torch.cat(xs) if xs else torch.zeros(0, 0))  # noqa: E731
    return idx, cat(imgs), cat(txts)


def batch_losses(img: torch.Tensor, txt: torch.Tensor, scale: float, batch_size: int) -> float:
    """Mean InfoNCE over consecutive batches, as the official validation loader (no shuffle,
    last batch kept) gives it. Local only: the embeddings are already complete."""
    losses = [clip_loss(img[s:s + batch_size], txt[s:s + batch_size], scale, gather=False).item()
              for s in range(0, len(img), batch_size)]
    return sum(losses) / max(len(losses), 1)


def validate(model, loader, captions: list[str], batch_size: int, device,
             gather=None, precision: str = "fp32", stable_ties: bool = False) -> dict:
    """Loss, strict_* and dup_* retrieval both ways and alignment on the whole validation set.

    `loader` yields this rank's shard; `gather` (loop.gather_list under DDP) collects every
    rank's rows, which are put back in data set order, so every rank returns the same numbers.
    """
    idx, img, txt = embed(model, loader, device, precision)
    if gather is not None:
        rows = gather([(i, a, b) for i, a, b in zip(idx, img, txt)])
        rows.sort(key=lambda r: r[0])
        idx = [r[0] for r in rows]
        img, txt = torch.stack([r[1] for r in rows]), torch.stack([r[2] for r in rows])
    scale = float(model.scale().detach())
    out = {"loss": batch_losses(img, txt, scale, batch_size), "n": len(idx),
           "temperature": 1.0 / scale}
    if len(idx) >= 2:
        out.update(metrics.pair_scores(img, txt, [captions[i] for i in idx], stable_ties))
    out["loss"] = out["loss"] if math.isfinite(out["loss"]) else float("inf")
    return out
