"""Contrastive training throughput (pairs/s) of train_contrastive.py's step; open_clip beside it.

One step is what loop.train does for train_contrastive.py: the forward of both towers through
contrastive.ContrastiveCLIP, the symmetric InfoNCE (losses.clip_loss), backward, gradient clipping
at 1.0, an AdamW step and zero_grad, on random pixels and real tokenised captions.

Configurations (issue 9): the tiny architecture with Mona, ViT-B/16 with Mona, ViT-B/16 with LoRA
(CLIP frozen, the fixed temperature 0.07), and ViT-B/16 "heads" (visual.proj, text_projection and
logit_scale train). open_clip's ViT-B-16 (QuickGELU), loaded with the same random weights, runs
the heads step too: the one configuration a peer can run (open_clip has no Mona). All
configurations take turns within one process, so load from other work falls on all alike; the
median and the fastest round are reported.

On CUDA the step runs under bf16 autocast at batch 64 (the official code's), and the model FLOPs
utilisation is printed against the GPU's dense bf16 peak (--peak-tflops, or a table by name).
FLOPs per step come from torch.utils.flop_counter on one step.

    flock /tmp/clip_us_bench.lock python bench/bench_contrastive.py --threads 2      # CPU, batch 8
    python bench/bench_contrastive.py --device cuda --batch-size 64
"""
from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from clip_us.adapters import AdapterConfig, apply_adapter  # noqa: E402
from clip_us.contrastive import ContrastiveCLIP, set_trainable  # noqa: E402
from clip_us.losses import clip_loss  # noqa: E402
from clip_us.model import build_model  # noqa: E402
from clip_us.tokenizer import tokenize  # noqa: E402

CONFIGS = {"tiny+mona": ("tiny", "mona", "adapter"), "B16+mona": ("ViT-B/16", "mona", "adapter"),
           "B16+lora": ("ViT-B/16", "lora", "adapter"), "B16 heads": ("ViT-B/16", "none", "heads"),
           "open_clip B16 heads": ("ViT-B/16", "open_clip", "heads")}
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0}
CAPTION = "Irregular breast lesion, 14.2 mm, spiculated margins, not parallel orientation, " \
          "heterogeneous hypoechoic echotexture, posterior acoustic shadowing."


def ours(arch: str, adapter: str, mode: str, device):
    torch.manual_seed(0)
    clip = build_model(config=arch)
    apply_adapter(clip, AdapterConfig(kind=adapter), freeze=False)
    model = ContrastiveCLIP(clip, 0.07 if mode == "adapter" else 0.0)
    set_trainable(model, mode, learn_temperature=mode != "adapter")
    return model.to(device).train()


def peer(device):
    """open_clip ViT-B-16 (QuickGELU) with our random ViT-B/16's weights, heads trainable."""
    import open_clip
    torch.manual_seed(0)
    sd = build_model(config="ViT-B/16").state_dict()
    model = open_clip.create_model("ViT-B-16-quickgelu", pretrained=None)
    model.load_state_dict(sd, strict=True)
    for name, p in model.named_parameters():
        p.requires_grad_(name in ("visual.proj", "text_projection", "logit_scale"))

    def forward(image, text):
        img = torch.nn.functional.normalize(model.encode_image(image), dim=-1)
        txt = torch.nn.functional.normalize(model.encode_text(text), dim=-1)
        return img, txt, model.logit_scale.exp().clamp(max=100)
    model.forward_pairs = forward
    return model.to(device).train()


def make_step(model, images, text, amp: bool, device):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.95), weight_decay=0.01)
    forward = getattr(model, "forward_pairs", model)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if amp else contextlib.nullcontext()

    def step():
        with autocast:
            img, txt, scale = forward(images, text)
            loss = clip_loss(img.float(), txt.float(), scale)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
    return step


def step_flops(step) -> float:
    from torch.utils.flop_counter import FlopCounterMode
    counter = FlopCounterMode(display=False)
    with counter:
        step()
    return float(counter.get_total_flops())


def peak_tflops(args) -> float | None:
    if args.peak_tflops:
        return args.peak_tflops
    name = torch.cuda.get_device_name() if args.device == "cuda" else ""
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch-size", type=int, default=0, help="0 = 8 on the CPU, 64 on CUDA")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    p.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    p.add_argument("--peak-tflops", type=float, default=0.0, help="GPU dense bf16 peak")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    batch = args.batch_size or (64 if device.type == "cuda" else 8)
    amp = device.type == "cuda"
    images = torch.randn(batch, 3, args.image_size, args.image_size, device=device)
    text = tokenize([CAPTION] * batch).to(device)
    steps, flops = {}, {}
    for name in args.configs:
        arch, adapter, mode = CONFIGS[name]
        model = peer(device) if adapter == "open_clip" else ours(arch, adapter, mode, device)
        steps[name] = make_step(model, images, text, amp, device)
        flops[name] = step_flops(steps[name])  # also the first warm-up step
    times = {name: [] for name in steps}
    for r in range(args.warmup + args.reps):
        for name, step in steps.items():  # interleaved: each round runs every configuration
            t0 = time.perf_counter()
            step()
            if r >= args.warmup:
                times[name].append(time.perf_counter() - t0)
    report(times, flops, batch, args, device)


def report(times, flops, batch, args, device):
    peak = peak_tflops(args) if device.type == "cuda" else None
    print(f"device {device} ({torch.get_num_threads()} threads, CPU capability "
          f"{torch.backends.cpu.get_cpu_capability()}), batch {batch}, {args.image_size} px, "
          f"{'bf16 autocast' if device.type == 'cuda' else 'fp32'}, {args.reps} interleaved rounds")
    print(f"{'config':22s} {'median s/step':>14s} {'pairs/s (median)':>17s} {'pairs/s (best)':>15s}"
          f" {'GFLOP/step':>11s}" + (f" {'MFU':>6s}" if peak else ""))
    for name, t in times.items():
        med, best = statistics.median(t), min(t)
        line = (f"{name:22s} {med:14.3f} {batch / med:17.2f} {batch / best:15.2f} "
                f"{flops[name] / 1e9:11.1f}")
        if peak:
            line += f" {flops[name] / med / (peak * 1e12):6.1%}"
        print(line)
    if "B16 heads" in times and "open_clip B16 heads" in times:
        ratio = statistics.median(times["B16 heads"]) / statistics.median(
            times["open_clip B16 heads"])
        print(f"clip_us / open_clip step time, heads mode (median): {ratio:.2f}")


if __name__ == "__main__":
    main()
