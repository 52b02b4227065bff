"""CLIP's image preprocessing: any PIL image or path -> normalised FloatTensor [3, S, S].

Follows OpenAI's `clip/clip.py` `_transform` (and open_clip's inference transform): resize the
shortest side to S with bicubic resampling, centre-crop S x S, scale to [0, 1], subtract CLIP's
mean and divide by its std. Colour handling matches `Image.convert("RGB")`, which is what OpenAI
does: grayscale is repeated to 3 channels, palette images are expanded, alpha is dropped.

Added for ultrasound, where 16-bit PNGs are common: 16-bit (and 32-bit integer / float) grayscale
images are resampled at full precision, scaled by the smallest bit depth that holds their peak
(10-, 12- and 16-bit data all arrive as 16-bit PNGs), the convention data.py uses too.
"""
from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
HIGH_DEPTH_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")


def mean_std(clip_norm: bool) -> tuple[tuple, tuple]:
    """The input normalisation (mean, std): CLIP's, or 0 and 1 per channel, which leaves [0, 1]
    pixels as they are (--no-clip-norm, as the ultrasound-CLIP paper's official code fed them)."""
    return (CLIP_MEAN, CLIP_STD) if clip_norm else ((0.0,) * 3, (1.0,) * 3)


def to_working_image(im: Image.Image) -> Image.Image:
    """8-bit modes -> RGB; high-bit-depth grayscale -> mode "F" with values in [0, 255]."""
    if im.mode not in HIGH_DEPTH_MODES:
        return im.convert("RGB")
    a = np.asarray(im, dtype=np.float64)
    bits = max(8, math.ceil(math.log2(max(float(a.max()), 0.0) + 1)))
    scaled = np.clip(a * (255.0 / (2 ** bits - 1)), 0, 255)
    return Image.fromarray(scaled.astype(np.float32), mode="F")


def open_image(path) -> Image.Image:
    """Read an image file fully (so the file is closed), naming the file when it cannot be read."""
    try:
        with Image.open(path) as im:
            im.load()
            return im.copy()
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise ValueError(f"{path}: cannot be read as an image ({type(e).__name__}: {e}); check "
                         f"that the file exists and is a complete PNG/JPEG/BMP/TIFF") from e


class Preprocess:
    """Callable transform; a class (not a lambda chain) so DataLoader workers can pickle it."""

    def __init__(self, size: int, mean=CLIP_MEAN, std=CLIP_STD):
        self.size = size
        self.mean = torch.tensor(mean).view(3, 1, 1)
        self.std = torch.tensor(std).view(3, 1, 1)

    def __repr__(self) -> str:
        return f"Preprocess(size={self.size}, bicubic shortest side, centre crop, CLIP mean/std)"

    def resize_crop(self, im: Image.Image) -> Image.Image:
        w, h = im.size
        # Shortest side -> size; the long side is rounded down, as torchvision's Resize(int) does.
        new = (self.size, int(self.size * h / w)) if w <= h else (int(self.size * w / h), self.size)
        if new != im.size:
            im = im.resize(new, Image.BICUBIC)
        left = int(round((im.size[0] - self.size) / 2.0))
        top = int(round((im.size[1] - self.size) / 2.0))
        return im.crop((left, top, left + self.size, top + self.size))

    def __call__(self, image) -> torch.Tensor:
        if not isinstance(image, Image.Image):
            image = open_image(image)
        im = self.resize_crop(to_working_image(image))
        x = torch.from_numpy(np.array(im, dtype=np.float32)) / 255.0
        x = x.permute(2, 0, 1) if x.ndim == 3 else x.expand(3, -1, -1)  # [H,W,3]|[H,W] -> [3,H,W]
        return (x - self.mean) / self.std
