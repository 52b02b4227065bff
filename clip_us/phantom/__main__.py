"""python -m clip_us.phantom: write the phantom data set (and, with --captions, its caption
manifest) into a new folder. The generator itself is clip_us/phantom/__init__.py."""
from __future__ import annotations

import time
from dataclasses import dataclass

from ..captions import phantom_manifest
from ..config import opt, parse_config, report_errors, required
from . import ORGANS, PhantomConfig, write_dataset


@dataclass(kw_only=True)
class PhantomCommand:
    """Write a synthetic B-mode ultrasound data set in the BUSI layout."""
    out: str = required("new folder to create")
    n: int = opt(PhantomConfig.n, "number of images")
    seed: int = opt(PhantomConfig.seed, "random seed of the images (and of the captions)")
    size: int = opt(PhantomConfig.size, "image side in pixels")
    organs: list = opt(list(ORGANS), "organs, drawn uniformly per image", choices=ORGANS)
    p_malignant: float = opt(PhantomConfig.p_malignant, "fraction of malignant lesions")
    p_normal: float = opt(PhantomConfig.p_normal, "fraction of lesion-free normal images (BUSI's "
                          "is 0.17)")
    captions: bool = opt(False, "also write a three-tier template caption manifest "
                         "(clip_us.captions)")
    debug: bool = opt(False, "show the traceback of an error")


def main(argv=None) -> None:
    a = parse_config(PhantomCommand, argv, description=PhantomCommand.__doc__,
                     prog="python -m clip_us.phantom")
    report_errors(a.debug)  # e.g. a folder that is not empty: one line, exit status 2
    cfg = PhantomConfig(size=a.size, n=a.n, seed=a.seed, organs=tuple(a.organs),
                        p_malignant=a.p_malignant, p_normal=a.p_normal)
    t0 = time.perf_counter()
    root = write_dataset(a.out, cfg)
    dt = time.perf_counter() - t0
    print(f"wrote {cfg.n} images to {root} in {dt:.1f} s ({1000 * dt / max(1, cfg.n):.1f} ms/image)")
    if a.captions:
        print(f"wrote the caption manifest {phantom_manifest(root, cfg, caption_seed=a.seed)}")


if __name__ == "__main__":
    main()
