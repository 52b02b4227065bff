"""Seconds per training epoch on BUSI-sized data (647 images, 8:1:1 -> 518 train), this machine.

The CLIP (Mona) segmentation row as train_seg.py runs it: the same training loop (clip_us.loop),
batch 32, Dice-CE, AdamW, a real DataLoader with augmentation from PNGs on disk, for the tiny
architecture and ViT-B/16. A full ViT-B/16 epoch takes many minutes on a 2-core CPU, so the loop
runs `--steps` + 1 batches; the time from the first batch's start to the last one's is `--steps`
whole steps (data loading, forward, backward, optimiser), extrapolated to the epoch; it says so.

    python bench/bench_epoch.py --steps 3 [--archs tiny ViT-B/16] [--workers 2]
"""
import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import torch  # noqa: E402
from torch.utils.data import Subset  # noqa: E402

from clip_us import loop  # noqa: E402
from clip_us.adapters import AdapterConfig, apply_adapter, freeze_backbone  # noqa: E402
from clip_us.data import DataConfig, build_datasets  # noqa: E402
from clip_us.heads import build_task_model  # noqa: E402
from clip_us.losses import dice_ce_loss  # noqa: E402
from clip_us.model import build_model  # noqa: E402
from clip_us.taskmodel import freeze_blocks_after  # noqa: E402


def time_epoch(arch: str, train_set, batch: int, steps: int, workers: int, out: str) -> dict:
    torch.manual_seed(0)
    clip = build_model(config=arch)
    apply_adapter(clip, AdapterConfig(kind="mona"))
    model = build_task_model(clip.visual, "seg")
    freeze_backbone(model)
    freeze_blocks_after(model.visual, 9)
    n_batches = len(train_set) // batch
    starts = []

    def loss_step(b, net):
        starts.append(time.perf_counter())
        return dice_ce_loss(net(b["image"]).float(), b["mask"])
    part = Subset(train_set, range((steps + 1) * batch))  # warm-up batch + `steps` timed ones
    loader = loop.train_loader(part, batch, workers, seed=0)
    loop.train(model, loader, loss_step, lambda m: (0.0, {}), seed=0, out_dir=out,
               settings=loop.Settings(epochs=1, amp=False))
    per_step = (starts[-1] - starts[0]) / steps
    return {"arch": arch, "s_per_step": per_step, "batches": n_batches,
            "s_per_epoch": per_step * n_batches}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--archs", nargs="+", default=["tiny", "ViT-B/16"])
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()
    root = os.path.join(tempfile.gettempdir(), "clip_us_bench_busi647")
    cfg = DataConfig(dataset="phantom", root=root, task="seg", phantom_n=647, phantom_size=512,
                     split_path=None)
    train_set, _, _, info = build_datasets(cfg)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"{len(train_set)} training images ({info['split']})")
    for arch in args.archs:
        with tempfile.TemporaryDirectory() as out:
            r = time_epoch(arch, train_set, args.batch, args.steps, args.workers, out)
        print(f"{arch:>9}: {r['s_per_step']:.2f} s/step x {r['batches']} batches = "
              f"{r['s_per_epoch']:.0f} s/epoch ({r['s_per_epoch'] / 60:.1f} min; "
              f"{args.steps} timed steps extrapolated)")


if __name__ == "__main__":
    main()
