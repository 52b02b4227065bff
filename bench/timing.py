"""Timing for the benchmarks: one call's seconds (CUDA synchronised), and interleaved medians.

Interleaving (one call of each contender per round) makes a load or clock change on a shared
machine fall on every contender alike; the median of the rounds is reported.
"""
from __future__ import annotations

import statistics
import time

import torch


def seconds(fn, device=None) -> float:
    """Wall-clock seconds of fn(); on CUDA, with the queue drained before and after."""
    cuda = device is not None and torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.synchronize()
    t = time.perf_counter()
    fn()
    if cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - t


def interleaved_medians(fns: dict, repeats: int, device=None) -> dict:
    """{name: median seconds} of `repeats` rounds after one warm-up call each, under
    inference_mode, each round calling every fn once."""
    times = {name: [] for name in fns}
    with torch.inference_mode():
        for fn in fns.values():
            fn()
        for _ in range(repeats):
            for name, fn in fns.items():
                times[name].append(seconds(fn, device))
    return {name: statistics.median(ts) for name, ts in times.items()}
