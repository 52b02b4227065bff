"""Checkpoint files and random-number state: atomic torch.save, safe loading, seeding, RNG capture.

A checkpoint is written to a temporary file and renamed (fileio.atomic_path), so a run killed
mid-write keeps its previous checkpoint. Loading uses `weights_only=True`, which refuses pickled
code; numpy's RNG state is therefore stored as a tensor. Every epoch re-seeds from (seed, epoch),
so a resumed run replays the batches, augmentations and dropout masks of an uninterrupted one.
"""
from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch

from .fileio import atomic_path


def save_checkpoint(path, obj: dict):
    """torch.save to a temporary file, then os.replace: a killed run never leaves half a file."""
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def load_checkpoint(path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"cannot read checkpoint {path} (truncated, or not written by "
                         f"clip_us): {e}") from e


def seed_everything(seed: int):
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def epoch_seed(seed: int, epoch: int) -> int:
    """The seed of one epoch of one run: resuming at any epoch reproduces it."""
    return seed * 100_003 + epoch


def rng_state() -> dict:
    # numpy's state goes in as a tensor: weights_only=True loading refuses numpy arrays.
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict):
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
