"""Building a ViT-B/16 CLIP from its weights: clip_us's build_model against open_clip's
create_model + load_state_dict, on the same random state dict, in one process.

    flock /tmp/clip_us_bench.lock python bench/bench_build.py [--repeats 5]

Every script builds one model per seed this way (weights.build_clip), and so does
`python -m clip_us.export`. build_model builds on the meta device and adopts copies of the
state dict's tensors, so it pays no random initialisation that the weights then replace;
open_clip initialises first. Rounds alternate between the two (bench.timing's rule), after one
warm-up each; the median is reported.
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.timing import seconds  # noqa: E402
from clip_us.model import ARCHS, CLIP, build_model  # noqa: E402


def contenders(sd: dict) -> dict:
    """{name: a call that builds ViT-B/16 (QuickGELU) from `sd`}."""
    import logging

    import open_clip  # test-only peer
    logging.getLogger().setLevel(logging.ERROR)  # its "no pretrained weights" line, each call

    def peer():
        model = open_clip.create_model("ViT-B-16-quickgelu")
        model.load_state_dict(sd)
    return {"clip_us build_model": lambda: build_model(sd, config="ViT-B/16"),
            "open_clip create_model + load_state_dict": peer}


def medians(fns: dict, repeats: int) -> dict:
    """{name: median seconds}, one warm-up each, then `repeats` interleaved rounds."""
    times = {name: [] for name in fns}
    for fn in fns.values():
        fn()
    for _ in range(repeats):
        for name, fn in fns.items():
            times[name].append(seconds(fn))
    return {name: statistics.median(ts) for name, ts in times.items()}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=5)
    a = ap.parse_args()
    torch.manual_seed(0)
    sd = CLIP(ARCHS["ViT-B/16"]).state_dict()
    print(f"CPU capability {torch.backends.cpu.get_cpu_capability()}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; median of {a.repeats}")
    for name, s in medians(contenders(sd), a.repeats).items():
        print(f"{name:45s} {s:6.2f} s")


if __name__ == "__main__":
    main()
