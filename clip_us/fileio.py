"""Atomic file writes: every checkpoint, result, split and figure goes through here.

A temporary file is written beside the target and `os.replace`d onto it, so a reader (or a run
killed half-way) never sees half a file; on failure the temporary file is removed and any old
file is kept. Standard library only, so data.py, viz.py and tables.py stay free of torch.
"""
from __future__ import annotations

import contextlib
import json
import os
import tempfile


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
