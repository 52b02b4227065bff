"""Fixed-seed tiny runs of every script on the phantom, reduced to their metrics, so that a
refactoring can be checked to change no number.

    python bench/behaviour_snapshot.py --out before.json            # on the old checkout
    python bench/behaviour_snapshot.py --out after.json --compare before.json

Each run uses the tiny architecture with random weights (no download) and one thread, so the
numbers are deterministic on one machine. `--compare` prints every metric that moved by more
than 1e-6 and exits 1 if any did.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--arch", "tiny", "--weights", "none", "--image-size", "64", "--phantom-n", "24",
        "--phantom-size", "128", "--workers", "0"]
TRAIN = TINY + ["--seeds", "1", "--batch-size", "8", "--eval-every", "1", "--reduce-dim", "32",
                "--epochs", "2"]
CONTRASTIVE = ["--phantom-n", "24", "--phantom-size", "64", "--image-size", "32", "--workers", "0",
               "--epochs", "2", "--batch-size", "8", "--split", "70,15,15", "--lr", "1e-3",
               "--arch", "tiny", "--weights", "none"]
EVALUATE = ["--arch", "tiny", "--image-size", "64", "--workers", "0", "--probe-fractions", "0.1",
            "--probe-seeds", "42", "--e2e-fractions", "0.3", "--e2e-seeds", "42",
            "--e2e-epochs", "1", "--bootstrap", "20", "--weights", "none"]


def runs(manifest: str) -> dict[str, list[str]]:
    """name -> command line (script first); the evaluate run reads the phantom manifest."""
    return {
        "train_seg": ["train_seg.py", *TRAIN, "--adapter", "mona"],
        "train_cls": ["train_cls.py", *TRAIN, "--adapter", "lora"],
        "zeroshot": ["zeroshot.py", *TINY, "--split", "all"],
        "contrastive_clip": ["train_contrastive.py", *CONTRASTIVE, "--adapter", "mona"],
        "contrastive_echocare": ["train_contrastive.py", "--model", "echocare", *CONTRASTIVE,
                                 "--text-encoder", "clip", "--train", "heads"],
        "evaluate": ["evaluate.py", "--manifest", manifest, *EVALUATE],
    }


def phantom_manifest(tmp: Path) -> str:
    """40 phantom images of two organs and three classes, as tests/test_evaluate.py makes them."""
    code = ("import sys; from clip_us import phantom; from clip_us.captions import phantom_manifest; "
            "cfg = phantom.PhantomConfig(n=40, size=96, "
            "organs=('breast', 'thyroid'), p_normal=0.2); "
            "print(phantom_manifest(sys.argv[1], cfg))")
    return subprocess.run([sys.executable, "-c", code, str(tmp / "phantom")], cwd=ROOT,
                          check=True, capture_output=True, text=True).stdout.strip()


def flatten(obj, prefix="") -> dict[str, float]:
    """Every number in a results.json's metric blocks, keyed by its path."""
    if isinstance(obj, dict):
        return {k: v for key, val in obj.items() for k, v in flatten(val, f"{prefix}{key}.").items()}
    if isinstance(obj, list):
        return {k: v for i, val in enumerate(obj) for k, v in flatten(val, f"{prefix}{i}.").items()}
    if isinstance(obj, (int, float)) and not isinstance(obj, bool):
        return {prefix.rstrip("."): float(obj)}
    return {}


KEYS = ("metrics", "untrained", "ci", "per_organ", "fewshot", "n_test")


def snapshot(tmp: Path) -> dict[str, dict[str, float]]:
    env = {**os.environ, "CLIP_US_CACHE": str(tmp / "cache"), "OMP_NUM_THREADS": "1",
           "PYTHONUNBUFFERED": "1"}
    found = {}
    for name, (script, *args) in runs(phantom_manifest(tmp)).items():
        out = tmp / name
        proc = subprocess.run([sys.executable, script, *args, "--out-dir", str(out)], cwd=ROOT,
                              env=env, capture_output=True, text=True)
        if proc.returncode:
            raise SystemExit(f"{name} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
        for path in sorted(out.rglob("results.json")):  # evaluate.py: one per model
            res, run = json.loads(path.read_text()), "/".join((name, *path.parent.relative_to(out).parts))
            found[run] = {k: v for key in KEYS if key in res for k, v in flatten(res[key], key + ".").items()}
            print(f"{run}: {len(found[run])} numbers", flush=True)
    return found


# The one intended change of the redesign: train_contrastive.py's validation retrieval now
# comes from the same functions as evaluate.py's, under their names (dup_* = identical captions
# interchangeable, what the old i2t_/t2i_ keys measured), beside the new strict_* family.
RENAMED = {f"{d}_R@{k}": f"dup_{d}_R@{k}" for d in ("i2t", "t2i") for k in (1, 5, 10)}


def renamed(key: str) -> str:
    part, _, rest = key.partition(".")
    name, _, tail = rest.partition(".")
    return ".".join(filter(None, (part, RENAMED.get(name, name), tail)))


def compare(old: dict, new: dict, tol=1e-6) -> tuple[list[str], list[str]]:
    """(numbers that moved or vanished, numbers that are new), old keys read through RENAMED."""
    moved, added = [], []
    for run in sorted(set(old) | set(new)):
        a = {renamed(k): v for k, v in old.get(run, {}).items()}
        b = new.get(run, {})
        for key in sorted(a):
            if key not in b or abs(a[key] - b[key]) > tol:
                moved.append(f"{run}: {key}: {a[key]} -> {b.get(key)}")
        added += [f"{run}: {key} = {b[key]}" for key in sorted(set(b) - set(a))]
    return moved, added


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="where to write the numbers (JSON)")
    ap.add_argument("--compare", default="", help="an earlier snapshot to compare with")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        found = snapshot(Path(tmp))
    Path(args.out).write_text(json.dumps(found, indent=1, sort_keys=True))
    if args.compare:
        moved, added = compare(json.loads(Path(args.compare).read_text()), found)
        runs_added = sorted({a.split(":")[0] for a in added})
        print("".join(f"{r}: {sum(a.startswith(r + ':') for a in added)} new numbers\n" for r in runs_added), end="")
        print("\n".join(moved) or "every earlier number equal to 1e-6 (renamed keys: RENAMED)")
        sys.exit(1 if moved else 0)


if __name__ == "__main__":
    main()
