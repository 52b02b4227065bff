"""Training-step time and peak memory of ViT-B/16's vision tower: frozen + LoRA, frozen + Mona and
full fine-tuning, against the plain forward time (issue 3's benchmark; the ultrasound-CLIP paper
(§3.1) adapters). "lora-shared" is LoRA with one dropout draw shared by q, k and v
(--lora-shared-dropout).

One step = forward of the whole tower (pooled embedding), an MSE loss, backward, AdamW step and
zero_grad. Frozen weights must compute no weight gradient: after every adapter step the script
asserts that each frozen parameter's .grad is still None.

Time: the four modes take turns within one process (warm-up rounds, then --reps rounds), so that
load from other work on a shared machine falls on all of them alike. The goals are checked on the
median, on the fastest round (the least disturbed one on a shared machine) and paired: the median
over rounds of the two modes' ratio within one round.

Memory. CUDA: torch.cuda.max_memory_allocated. CPU: each mode runs two repetitions in its own
subprocess, which reports the peak resident set size of that process (resource.getrusage
ru_maxrss), and that peak minus the RSS just before the first step (the step's own footprint:
activations, gradients, optimizer state). RSS includes allocator slack and is noisy on a shared machine, so the script
also counts exactly what the step must hold: the bytes autograd saves for backward (unique
storages other than parameters, via torch.autograd.graph.saved_tensors_hooks) plus gradients
and AdamW state for the trainable parameters (3 x 4 bytes each).

    flock /tmp/clip_us_bench.lock python bench/bench_adapters.py            # CPU, batch 8
    python bench/bench_adapters.py --device cuda --reps 20                  # bf16 autocast on GPU
Goals: adapter step <= 0.75 x full step, and adapter step <= 2.5 x forward.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from bench.timing import seconds  # noqa: E402
from clip_us.adapters import AdapterConfig, apply_adapter, format_count  # noqa: E402
from clip_us.lora import add_lora, keep_mask, mark_only_trainable  # noqa: E402
from clip_us.model import build_model  # noqa: E402

MODES = ("forward", "lora", "lora-shared", "mona", "full")


def rss_mb() -> float:
    with open("/proc/self/statm") as f:  # pages: size resident ...
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def build(mode: str, device: torch.device):
    torch.manual_seed(0)
    visual = build_model(config="ViT-B/16").visual
    if mode in ("lora", "mona"):
        apply_adapter(visual, AdapterConfig(kind=mode))  # freezes all but the adapter
    if mode == "lora-shared":  # one dropout draw for q, k and v (--lora-shared-dropout)
        mark_only_trainable(add_lora(visual, shared_dropout=True), ("lora_",))
    return visual.to(device).train()


def saved_activation_mb(visual, x, amp) -> float:
    """MB of tensors autograd keeps for backward in one forward, parameters excluded."""
    params = {p.untyped_storage().data_ptr() for p in visual.parameters()}
    seen = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            seen[ptr] = t.untyped_storage().nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), amp:
        visual(x)
    return sum(seen.values()) / 2**20


def setup(mode: str, args):
    """(what one repetition of `mode` runs, its tower, its trainable params, inputs, amp)."""
    device = torch.device(args.device)
    visual = build(mode, device)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(args.batch, 3, 224, 224, generator=g).to(device)
    target = torch.randn(args.batch, visual.output_dim, generator=g).to(device)
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" \
        else contextlib.nullcontext()  # CPU: fp32 (autocast is slower there)
    params = [p for p in visual.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.95), weight_decay=0.01)
    frozen = [p for p in visual.parameters() if not p.requires_grad]

    def forward():
        with torch.no_grad(), amp:
            visual(x)

    def step():
        with amp:
            loss = (visual(x).float() - target).square().mean()
        loss.backward()
        if any(p.grad is not None for p in frozen):
            raise AssertionError(f"{mode}: a frozen parameter received a gradient")
        opt.step()
        opt.zero_grad(set_to_none=True)
    return (forward if mode == "forward" else step), visual, params, x, amp


def memory_of(mode: str, args) -> dict:
    """Peak memory of two repetitions of `mode` (run in a fresh process), plus exact counts."""
    fn, visual, params, x, amp = setup(mode, args)
    before = rss_mb()
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    fn(), fn()
    out = {"params": format_count(visual)}
    if args.device.startswith("cuda"):
        out["peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
    else:
        out["peak_mb"], out["step_mb"] = peak_rss_mb(), peak_rss_mb() - before
    if mode != "forward":  # after the peak was read: this extra forward must not count in it
        out["saved_mb"] = saved_activation_mb(visual, x, amp)
        out["state_mb"] = 12 * sum(p.numel() for p in params) / 2**20
    return out


def mask_times(batch: int, reps: int = 30) -> dict:
    """Median ms of one LoRA dropout mask [batch, 197, 768], p = 0.1, on the CPU: nn.Dropout's
    bernoulli_ against lora.keep_mask (the same distribution), taking turns."""
    x = torch.empty(batch, 197, 768)
    draws = {"bernoulli_": lambda: torch.empty_like(x).bernoulli_(0.9),
             "keep_mask": lambda: keep_mask(x.shape, 0.1)}
    times = {name: [] for name in draws}
    for _ in range(reps):
        for name, draw in draws.items():
            t = time.perf_counter()
            draw()
            times[name].append(1000 * (time.perf_counter() - t))
    return {name: sorted(ts)[len(ts) // 2] for name, ts in times.items()}


def interleaved_times(args) -> dict:
    """Median seconds per mode, the modes taking turns, so that load from other work on a shared
    machine falls on all of them alike."""
    fns = {mode: setup(mode, args)[0] for mode in MODES}
    device = torch.device(args.device)
    times = {mode: [] for mode in MODES}
    for rep in range(args.warmup + args.reps):
        order = MODES[rep % len(MODES):] + MODES[:rep % len(MODES)]  # rotated: a load trend
        for mode in order:                                           # falls on every mode alike
            t = seconds(fns[mode], device)
            if rep >= args.warmup:
                times[mode].append(round(t, 3))
    return times


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=0,
                    help="torch threads (0: torch's default). On a shared machine 1 thread is "
                         "steadier: a 2-thread parallel region stalls when the other core is busy")
    ap.add_argument("--mode", choices=MODES, help="measure one mode's memory (internal)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.mode:
        print(json.dumps(memory_of(args.mode, args)))
        return
    results = {}
    for mode in MODES:  # a fresh process each, so that peak RSS belongs to that mode alone
        cmd = [sys.executable, __file__, "--mode", mode, "--device", args.device,
               "--batch", str(args.batch), "--threads", str(args.threads)]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
        results[mode] = json.loads(proc.stdout.strip().splitlines()[-1])
    for mode, times in interleaved_times(args).items():
        results[mode].update(times_s=times, median_s=sorted(times)[len(times) // 2])
    report(results, args)
    if args.device == "cpu":
        ms = mask_times(args.batch)
        print(f"one dropout mask [{args.batch}, 197, 768]: bernoulli_ {ms['bernoulli_']:.2f} ms, "
              f"keep_mask {ms['keep_mask']:.2f} ms ({ms['bernoulli_'] / ms['keep_mask']:.1f}x)")


def report(results: dict, args):
    print(f"ViT-B/16 vision tower, batch {args.batch}, 224x224, {args.device}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"median of {args.reps} (+{args.warmup} warm-up)")
    fwd, full = results["forward"]["median_s"], results["full"]["median_s"]
    for mode, r in results.items():
        mem = f"peak {r['peak_mb']:.0f} MB" + (f" (step +{r['step_mb']:.0f} MB)" if "step_mb" in r
                                              else "")
        if "saved_mb" in r:
            mem += f", saved {r['saved_mb']:.0f} + grad/AdamW {r['state_mb']:.0f} MB"
        ratios = "" if mode in ("forward", "full") else \
            f"  {r['median_s'] / full:.2f}x full, {r['median_s'] / fwd:.2f}x forward"
        print(f"{mode:11s} {r['median_s']:7.3f} s  {mem}  {r['params']}{ratios}")
        print(f"{'':11s} runs {r['times_s']}")
    picks = (("median", lambda r: r["median_s"]), ("fastest", lambda r: min(r["times_s"])))
    for stat, pick in picks:
        full, fwd = pick(results["full"]), pick(results["forward"])
        for mode in ("lora", "lora-shared", "mona"):
            goal_line(mode, stat, pick(results[mode]) / full, pick(results[mode]) / fwd)
    # Paired: the median over rounds of (mode / full) within the same round. The modes of one
    # round run back to back, so a load or clock change between rounds cancels out.
    for mode in ("lora", "lora-shared", "mona"):
        goal_line(mode, "paired", paired(results, mode, "full"), paired(results, mode, "forward"))


def paired(results: dict, mode: str, base: str) -> float:
    ratios = sorted(a / b for a, b in zip(results[mode]["times_s"], results[base]["times_s"]))
    return ratios[len(ratios) // 2]


def goal_line(mode: str, stat: str, vs_full: float, vs_forward: float):
    print(f"goal {mode} ({stat}): {vs_full:.2f}x full (<=0.75 "
          f"{'met' if vs_full <= 0.75 else 'MISSED'}), {vs_forward:.2f}x forward (<=2.5 "
          f"{'met' if vs_forward <= 2.5 else 'MISSED'})")


if __name__ == "__main__":
    main()
