"""Benchmark: the linear probe's fit — clip_us.evaluation.probe.LogisticProbe vs scikit-learn's LogisticRegression.

Both run in this process, interleaved, on the same standardised features: EchoCare-CLIP's held-out
BUSI size (546 training images, 3 imbalanced classes, 256-d embeddings like its dual encoder; 512-d
like CLIP ViT-B/32) and a larger in-distribution-like case (12,000 x 256). For each C of the
protocol's grid {0.01, 0.1, 1, 10}: seconds per fit (median over rounds), the ratio, iterations,
and the largest probability difference. scikit-learn runs with its defaults (tol 1e-4), as the
authors did; ours converges further (tolerance 1e-10 on the gradient), so it does more iterations.
The last column compares ours with scikit-learn run to tol 1e-10 (untimed): the exact optimum.
Run from the repository root: ``flock /tmp/clip_us_bench.lock python -m bench.bench_probe [--rounds 3] [--threads 1]``
"""
import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from clip_us.evaluation.probe import LogisticProbe  # noqa: E402

CASES = (("BUSI-like 546x256", 546, 256), ("BUSI-like 546x512", 546, 512), ("12000x256", 12000, 256))


def features(n: int, d: int, seed: int = 0):
    """Unit-norm embeddings of three classes (57/28/15 %) with overlapping class means."""
    rng = np.random.default_rng(seed)
    y = rng.choice(3, size=n, p=[0.57, 0.28, 0.15])
    x = rng.normal(size=(3, d))[y] * 0.15 + rng.normal(size=(n, d))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return StandardScaler().fit_transform(x), y


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    LogisticProbe().fit(*features(50, 8))  # torch.optim's one-time import, outside the timing
    print(f"torch {torch.__version__}, CPU capability {torch.backends.cpu.get_cpu_capability()}, "
          f"{args.threads} thread(s), median of {args.rounds} interleaved rounds")
    print(f"{'case':20s} {'C':>5s} {'ours s':>8s} {'sklearn s':>9s} {'ratio':>6s} {'it ours':>7s} "
          f"{'it skl':>6s} {'max |dp|':>9s} {'|dp| tight':>10s}")
    for name, n, d in CASES:
        x, y = features(n, d)
        for C in (0.01, 0.1, 1.0, 10.0):
            ours, theirs = [], []
            for _ in range(args.rounds):
                t, probe = timed(lambda: LogisticProbe(C=C).fit(x, y))
                ours.append(t)
                t, ref = timed(lambda: LogisticRegression(C=C, class_weight="balanced", max_iter=3000).fit(x, y))
                theirs.append(t)
            dp = np.abs(probe.predict_proba(x) - ref.predict_proba(x)).max()
            tight = LogisticRegression(C=C, class_weight="balanced", max_iter=3000, tol=1e-10).fit(x, y)
            dt = np.abs(probe.predict_proba(x) - tight.predict_proba(x)).max()
            a, b = np.median(ours), np.median(theirs)
            print(f"{name:20s} {C:5g} {a:8.3f} {b:9.3f} {a / b:6.2f} {probe.n_iter_:7d} "
                  f"{int(ref.n_iter_[0]):6d} {dp:9.1e} {dt:10.1e}")


if __name__ == "__main__":
    main()
