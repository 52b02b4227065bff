"""Checkpoint files and random-number state: atomic torch.save, safe loading, seeding, RNG capture.

A checkpoint is written to a temporary file and renamed (fileio.atomic_path), so a run killed
mid-write keeps its previous checkpoint. Loading uses `weights_only=True`, which refuses pickled
code; numpy's RNG state is therefore stored as a tensor. Every epoch re-seeds from (seed, epoch),
so a resumed run replays the batches, augmentations and dropout masks of an uninterrupted one.
"""
from __future__ import annotations

import errno
import random
import shutil
from pathlib import Path

import numpy as np
import torch

from .fileio import atomic_path


def _free_mb(path: Path) -> str:
    try:
        return f"{shutil.disk_usage(path.parent if path.parent.exists() else '.').free / 2**20:.0f} MB"
    except OSError:
        return "unknown space"


def _disk_full(e: Exception) -> bool:
    """torch.save reports a full disk as inline_container.cc's "unexpected pos" or "file write
    failed", not as ENOSPC."""
    text = str(e)
    return getattr(e, "errno", None) == errno.ENOSPC or "unexpected pos" in text \
        or "file write failed" in text or "PytorchStreamWriter failed" in text


def save_checkpoint(path, obj: dict):
    """torch.save to a temporary file, then os.replace: a killed run never leaves half a file.
    A full disk is said as such, with the path."""
    path = Path(path)
    try:
        with atomic_path(path) as tmp:
            torch.save(obj, tmp)
    except (OSError, RuntimeError) as e:
        if not _disk_full(e):
            raise
        raise OSError(errno.ENOSPC, f"disk full: cannot write checkpoint {path} ({_free_mb(path)} "
                                    f"free there); free some space, or pass --out-dir on a disk "
                                    f"with room") from e


def _not_a_checkpoint(path: Path) -> str | None:
    """Why `path` cannot be a torch checkpoint, judged by its first bytes (None: it may be)."""
    with open(path, "rb") as f:
        head = f.read(64)
    if not head:
        return "the file is empty"
    if head.startswith(b"PK\x03\x04") or head[:1] == b"\x80":   # torch's zip, or a legacy pickle
        return None
    if all(32 <= b < 127 or b in (9, 10, 13) for b in head):
        return f"it is a text file (it begins {head[:40].decode()!r})"
    return f"it is not a PyTorch file (it begins {head[:8]!r})"


def load_checkpoint(path) -> dict:
    """A checkpoint written by this package's scripts, read with weights_only=True."""
    path = Path(path)
    if not str(path) or path == Path("."):
        raise FileNotFoundError("no checkpoint given: pass --checkpoint PATH (a seed<N>/best.pt)")
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    why = _not_a_checkpoint(path)
    if why:
        raise ValueError(f"{path} is not a checkpoint: {why}. --init and --checkpoint take a .pt "
                         f"file written by train_seg.py, train_cls.py or train_contrastive.py")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise ValueError(f"cannot read checkpoint {path} (truncated, or not written by "
                         f"clip_us): {first}") from e


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
