"""Data pipeline throughput: PNG on disk -> cropped, resized, (augmented,) normalised tensor.

On a BUSI-sized phantom (647 images, BUSI's count; 512 x 512 by default, near BUSI's ~500 x 600
images) this prints, in images/s:
- phantom generation (ms per 256 x 256 image, the speed goal of issue 2);
- build_datasets (scan, decode-check every file once, split);
- one process, no DataLoader: eval path and training path (with augmentation);
- the reference: the official code's eval path (PIL open, convert L, resize, ToTensor, no crop),
  and our ratio to it;
- DataLoader with 0, 1 and 2 workers, batch 32, over the training set.

    flock /tmp/clip_us_bench.lock python bench/bench_data.py [--size 512] [--n 647]
"""
import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # run from anywhere

import torch
import torchvision.transforms as T
from PIL import Image
from torch.utils.data import DataLoader

from clip_us.data import DataConfig, build_datasets
from clip_us.phantom import PhantomConfig, make_sample, write_dataset


def rate(fn, n: int) -> float:
    t = time.perf_counter()
    fn()
    return n / (time.perf_counter() - t)


def per_item(ds, n: int) -> float:
    return rate(lambda: [ds[i % len(ds)] for i in range(n)], n)


def official_eval(paths, size: int) -> float:
    """NextGen-UIA's USDataset without augmentation: open, L, resize, ToTensor, 3 channels."""
    tf = T.Compose([T.ToTensor(), T.ConvertImageDtype(torch.float32)])
    def run():
        for p in paths:
            tf(Image.open(p).convert("L").resize((size, size))).repeat(3, 1, 1)
    return rate(run, len(paths))


def loader_rate(ds, workers: int, batch: int) -> float:
    dl = DataLoader(ds, batch_size=batch, shuffle=True, num_workers=workers,
                    persistent_workers=False)
    return rate(lambda: [b for b in dl], len(ds))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--n", type=int, default=647)
    p.add_argument("--size", type=int, default=512, help="phantom image side")
    p.add_argument("--out-size", type=int, default=224)
    p.add_argument("--root", default="", help="BUSI-layout folder; a phantom is written there "
                                              "if it has none (default: a temp folder)")
    a = p.parse_args()
    torch.set_num_threads(1)   # data workers run single-threaded; the model gets the cores

    g = PhantomConfig(size=256)
    make_sample(0, g)
    print(f"phantom generation 256x256: {1000 / rate(lambda: [make_sample(i, g) for i in range(50)], 50):.1f} ms/image")

    tmp = tempfile.TemporaryDirectory()
    root = Path(a.root) if a.root else Path(tmp.name) / "busi"
    if not (root / "metadata.jsonl").is_file():
        t = time.perf_counter()
        write_dataset(root, PhantomConfig(size=a.size, n=a.n, seed=0, organs=("breast",),
                                          p_second_lesion=0.05))
        print(f"wrote {a.n} phantom images of {a.size}x{a.size} in {time.perf_counter() - t:.1f} s")
    cfg = DataConfig(dataset="busi", root=str(root), task="seg", size=a.out_size)
    t = time.perf_counter()
    train, val, test, info = build_datasets(cfg)
    print(f"build_datasets (scan + decode-check {a.n} files + split): {time.perf_counter() - t:.2f} s, "
          f"{len(train)}/{len(val)}/{len(test)}")
    evalset = build_datasets(DataConfig(**{**vars(cfg), "train_aug": False}))[0]
    clsset = build_datasets(DataConfig(**{**vars(cfg), "train_aug": False, "task": "cls",
                                          "check_files": False}))[0]
    n = min(200, len(train))
    ours_eval, ours_train, ours_cls = per_item(evalset, n), per_item(train, n), per_item(clsset, n)
    ref = official_eval([it.image for it in train.items[:n]], a.out_size)
    print(f"one process, {a.size}px PNG -> [3,{a.out_size},{a.out_size}] + mask:")
    print(f"  ours eval path (crop, resize, normalise): {ours_eval:7.1f} img/s")
    print(f"  ours train path (+ augmentation):         {ours_train:7.1f} img/s")
    print(f"  ours eval path, image only (cls):          {ours_cls:7.1f} img/s")
    print(f"  official eval path (no crop, image only): {ref:7.1f} img/s   ratio ours(cls)/official "
          f"{ours_cls / ref:.2f}")
    for w in (0, 1, 2):
        print(f"  DataLoader train, batch 32, workers={w}: {loader_rate(train, w, 32):7.1f} img/s")
    print(f"cpu count {os.cpu_count()}, torch threads 1 per worker")


if __name__ == "__main__":
    main()
