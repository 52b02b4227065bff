"""Atomic file writes: every checkpoint, result, split and figure goes through here.

A temporary file is written beside the target and `os.replace`d onto it, so a reader (or a run
killed half-way) never sees half a file; on failure the temporary file is removed and any old
file is kept. Checkpoints are read with `weights_only=True`, which refuses pickled code.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary path beside `path`; it replaces `path` when the block succeeds."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=os.path.basename(path))
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; results are meant to be shared
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def cache_dir(download_root: str | None = None) -> str:
    """Where weights and generated data live: `download_root`, else $CLIP_US_CACHE, else
    ~/.cache/clip_us. The one definition every loader and the phantom use."""
    root = download_root or os.environ.get("CLIP_US_CACHE") or "~/.cache/clip_us"
    return os.path.expanduser(root)


def write_bytes(path, data: bytes):
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(data)


def write_text(path, text: str):
    write_bytes(path, text.encode("utf-8"))


def write_json(path, obj, indent: int = 2):
    write_text(path, json.dumps(obj, indent=indent, default=str) + "\n")

# ----------------------------------------------------------------------------- checkpoints: atomic torch.save, safe loading
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
