"""Benchmark: one training step of the authors' whole-model end-to-end few-shot (evaluate.py
--e2e whole), batch 16 at full size, fp32: ViT-B/16 at 224 px (CLIPWhole) and the EchoCare-CLIP
dual encoder (Swin at 256 px + ViT-B/32's text tower, DualWhole), random weights of the real
sizes. A step = 16 images and one organ's 3 class prompts through the encoders, cross-entropy on
scale · cos, backward, gradient clipping 1.0, AdamW (lr 1e-5, weight decay 1e-4), the model in
train mode, through clip_us.evaluation.protocol's own train_step.

Prints the CPU (torch's capability, lscpu's model name), the median seconds of the timed steps
after one warm-up step, and what one run then costs: 4 epochs of ceil(n / 16) steps each.

    flock /tmp/clip_us_bench.lock python bench/bench_e2e.py [--threads 2] [--steps 3] [--device cpu]
"""
import argparse
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.timing import seconds  # noqa: E402
from clip_us import echocare  # noqa: E402
from clip_us.evaluation.models import CLIPWhole, DualWhole  # noqa: E402
from clip_us.evaluation.protocol import Fit, train_step  # noqa: E402
from clip_us.weights import build_clip  # noqa: E402

PROMPTS = [[f"An ultrasound image of breast with {c} findings." for c in ("benign", "malignant", "normal")]]


class PixelTask:
    """protocol.ImageTask's interface on fixed random pixels (no image files to read)."""
    mode = "whole"

    def __init__(self, module, size: int, device, batch: int = 16):
        self.module, self.device = module, device
        self.pixels = torch.randn(batch, 3, size, size)

    def images(self, m, part, rows):
        return m.embed_image(self.pixels[torch.as_tensor(rows)].to(self.device))

    def prompts(self, m):
        return m.embed_text(PROMPTS[0]).view(1, 3, -1)


def cpu_name() -> str:
    out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    return next((ln.split(":", 1)[1].strip() for ln in out.splitlines() if ln.startswith("Model name")), "?")


def step_seconds(module, size: int, device, steps: int, batch: int = 16) -> float:
    module = module.to(device).train()
    task = PixelTask(module, size, device, batch)
    rows = np.arange(batch)
    fit = Fit("breast", np.arange(3), {"train": rows}, {"train": rows % 3}, {"train": rows * 0})
    opt = torch.optim.AdamW(module.parameters(), lr=1e-5, weight_decay=1e-4)
    times = [seconds(lambda: train_step(task, module, fit, rows, opt, 1.0), device) for _ in range(steps + 1)]
    return statistics.median(times[1:])  # the first step (allocation, warm-up) is left out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch", type=int, default=16, help="images per step; below 16 the time "
                    "per 16 images is scaled linearly (for machines where 16 does not fit)")
    ap.add_argument("--models", nargs="+", default=["vit", "swin"], choices=["vit", "swin"])
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"device {args.device}; CPU {cpu_name()}; torch {torch.__version__}, capability "
          f"{torch.backends.cpu.get_cpu_capability()}, {torch.get_num_threads()} threads")
    torch.manual_seed(0)
    models = {"vit": ("ViT-B/16 CLIP, 224 px", lambda: CLIPWhole(build_clip("none", "ViT-B/16")), 224),
              "swin": ("EchoCare Swin + CLIP text, 256 px", lambda: DualWhole(
                  echocare.build(random_weights=True, arch="echocare"), torch.tensor(0.07).log()), 256)}
    for name, make, size in (models[k] for k in args.models):
        module = make()
        n = sum(p.numel() for p in module.parameters())
        s = step_seconds(module, size, args.device, args.steps, args.batch) * 16 / args.batch
        scaled = "" if args.batch == 16 else f" (measured at batch {args.batch}, scaled)"
        print(f"{name:<36} {n / 1e6:6.1f} M parameters   {s:7.2f} s / step of 16{scaled}   one run of 4 "
              f"epochs on 545 training images (BUSI's): {4 * -(-545 // 16) * s / 60:6.1f} min "
              f"(+ validation and test passes)")
        del module


if __name__ == "__main__":
    main()
