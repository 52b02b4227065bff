"""EchoCare-CLIP's data side: image transforms, normalisation statistics, the caption data set,
and the small WordPiece vocabulary of a tiny random BERT.

Follows the authors' released code (`echocare_clip/data/dataset.py`, `normalization.py`):
- training: resize the shorter side to 1.125 x S (288 for S = 256, aspect kept), random S x S
  crop, horizontal flip; evaluation: resize the shorter side to S, centre crop S x S;
- normalisation with the training set's per-channel mean and std (theirs: mean (0.1909, 0.1927,
  0.1964), std (0.2000, 0.2014, 0.2043)); `norm_stats` computes them from a run's own training
  split through the evaluation transform, as their preparation script did. It pools every pixel
  exactly; theirs averaged per-batch (64 images) means and variances, which omits the small
  between-batch part of the variance.
Images are read as RGB; 16-bit grayscale is first scaled by its bit depth (transform.py's rule)
and then rounded to 8 bits, where the authors' `convert("RGB")` would clip it.
"""
from __future__ import annotations

from collections import Counter

import numpy as np
import torch
from PIL import Image
from torchvision import transforms as T

from ..contrastive import CaptionDataset
from ..transform import mean_std, open_image, to_working_image
from .bert import SPECIALS, clean_text, split_punct, strip_accents

AUTHORS_MEAN = (0.1909, 0.1927, 0.1964)
AUTHORS_STD = (0.2000, 0.2014, 0.2043)


def read_rgb(path) -> Image.Image:
    """An 8-bit RGB PIL image from any file transform.open_image reads."""
    im = to_working_image(open_image(path))
    if im.mode == "F":  # high bit depth, already scaled to [0, 255]
        im = Image.fromarray(np.rint(np.asarray(im)).astype(np.uint8), mode="L")
    return im.convert("RGB")


def image_transform(size: int, train: bool, mean=AUTHORS_MEAN, std=AUTHORS_STD) -> T.Compose:
    """The authors' torchvision pipelines (bilinear resizing, PIL)."""
    if train:
        steps = [T.Resize(int(size * 1.125)), T.RandomCrop(size), T.RandomHorizontalFlip()]
    else:
        steps = [T.Resize(size), T.CenterCrop(size)]
    return T.Compose(steps + [T.ToTensor(), T.Normalize(mean=list(mean), std=list(std))])


def norm_stats(paths, size: int) -> tuple[tuple, tuple]:
    """Per-channel (mean, std) of every pixel of the images after the evaluation resize/crop."""
    tf = image_transform(size, False, *mean_std(False))  # [0, 1] pixels
    total = torch.zeros(3, dtype=torch.float64)
    squares = torch.zeros(3, dtype=torch.float64)
    n = 0
    for path in paths:
        x = tf(read_rgb(path)).double().flatten(1)  # [3, S*S]
        total, squares, n = total + x.sum(1), squares + x.square().sum(1), n + x.shape[1]
    if n == 0:
        raise ValueError("--norm-stats train: the training split has no images")
    mean = total / n
    std = (squares / n - mean.square()).clamp_min(0).sqrt()
    return tuple(round(v, 6) for v in mean.tolist()), tuple(round(v, 6) for v in std.tolist())


class FromPath:
    """A PIL-image transform applied to an image file read by `reader` (read_rgb here); a class
    so DataLoader workers can pickle it."""

    def __init__(self, transform, reader):
        self.transform, self.reader = transform, reader

    def __call__(self, path):
        return self.transform(self.reader(path))


def caption_dataset(pairs, tokenize, size: int, train: bool, mean=AUTHORS_MEAN,
                    std=AUTHORS_STD) -> CaptionDataset:
    """manifest.Pair list -> CaptionDataset of dict(image [3, S, S], text [2, L] (token ids,
    attention mask), caption, key, index): the authors' pipelines on RGB images, captions
    tokenised by the model's own tokenizer."""
    return CaptionDataset(pairs, FromPath(image_transform(size, train, mean, std), read_rgb), tokenize)


def tiny_vocab(captions, size: int = 2000) -> list[str]:
    """A WordPiece vocabulary for a tiny random BERT: the special tokens, every character (bare
    and as a ## continuation), then the most frequent lower-cased words of `captions`, so that
    every caption tokenises without [UNK]. Deterministic: ties are broken alphabetically."""
    words = Counter()
    for caption in captions:
        for chunk in clean_text(caption).split():
            words.update(split_punct(strip_accents(chunk.lower())))
    chars = sorted({c for w in words for c in w})
    common = [w for w, _ in sorted(words.items(), key=lambda kv: (-kv[1], kv[0]))]
    vocab = list(SPECIALS) + chars + ["##" + c for c in chars]
    return list(dict.fromkeys(vocab + common[:max(0, size - len(vocab))]))
