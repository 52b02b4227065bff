"""The class names and their fixed order, shared by every script, data layout and prompt set.

benign = 0 and malignant = 1 (the positive class for AUC, sensitivity and F1); normal = 2 exists
only when a run asks for it (BUSI's `normal` folder with `--keep-normal`). Standard library only.
"""
from __future__ import annotations

CLASSES = ("benign", "malignant", "normal")


def parse_label(value) -> int | None:
    """A class name or index ("benign", "Malignant", "1") -> its index; None when unknown."""
    v = str(value).strip().lower()
    if v in CLASSES:
        return CLASSES.index(v)
    return int(v) if v.isdigit() and int(v) < len(CLASSES) else None
