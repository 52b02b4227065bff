"""End to end: the three scripts on a tiny phantom with the tiny architecture and random weights.

Each run is a subprocess, as a user would start it. Resume is tested by killing a run part-way
(SIGKILL, wherever it happens to be) and continuing it: the final losses and metrics must equal
an uninterrupted run's.
"""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--arch", "tiny", "--weights", "none", "--image-size", "64", "--phantom-n", "24",
        "--phantom-size", "128", "--workers", "0"]
TRAIN = TINY + ["--seeds", "1", "--batch-size", "8", "--eval-every", "1", "--reduce-dim", "32"]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    return {**os.environ, "CLIP_US_CACHE": str(cache), "PYTHONUNBUFFERED": "1"}


def run(script, args, env, check=True):
    proc = subprocess.run([sys.executable, str(ROOT / script), *args], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    if check and proc.returncode:
        raise AssertionError(f"{script} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def test_train_seg_writes_results_row_and_figures(tmp_path, env):
    out = tmp_path / "seg"
    proc = run("train_seg.py", TRAIN + ["--epochs", "2", "--adapter", "mona", "--out-dir", str(out)], env)
    assert "RANDOM weights" in proc.stdout
    res = json.loads((out / "results.json").read_text())
    assert res["task"] == "seg" and res["row"] == "CLIP (Mona)" and res["seeds"] == [1]
    assert set(res["metrics"]) == {"dice", "iou", "hd95", "asd_directed", "assd"}
    assert 0 <= res["metrics"]["dice"]["mean"] <= 1 and res["units"]["hd95"] == "px"
    assert res["config"]["epochs"] == 2
    header = (out / "row.csv").read_text().splitlines()[0]
    assert header == "dataset,row,Dice,IoU,HD95,ASD (directed),ASSD"
    for name in ("overlays_seed1.png", "loss.svg", "config.json", "log.jsonl", "split.json",
                 "seed1/best.pt", "seed1/last.pt"):
        assert (out / name).is_file(), name
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log if "loss" in r] == [1, 2]


def predictions(out):
    return {r["path"]: r["prob"] for r in json.loads((out / "predictions_seed1.json").read_text())}


def test_train_cls_frozen_lora_then_eval_only_single_and_ddp(tmp_path, env):
    import torch
    out = tmp_path / "cls"
    run("train_cls.py", TRAIN + ["--epochs", "2", "--adapter", "lora", "--adapter-train", "no",
                                 "--cls-head", "pool", "--out-dir", str(out)], env)
    res = json.loads((out / "results.json").read_text())
    assert res["task"] == "cls" and res["row"] == "CLIP (LoRA)"
    assert (out / "row.csv").read_text().splitlines()[0] == "dataset,row,Acc,AUC"
    assert (out / "roc_seed1.svg").is_file()
    ckpt = torch.load(out / "seed1/best.pt", weights_only=True)
    lora_b = [v for k, v in ckpt["adapter_state_dict"].items() if "lora_B" in k]
    assert lora_b and all(not v.any() for v in lora_b)  # --adapter-train no: LoRA stayed at init
    assert ckpt["head_state_dict"] and "optimizer" not in ckpt

    # An external set is evaluated whole, without augmentation, with the trained weights: the
    # training run's test images get the same probabilities.
    ext = tmp_path / "external"
    args = ["--eval-only", "--checkpoint", str(out / "seed1/best.pt"), "--workers", "0",
            "--phantom-n", "24", "--phantom-size", "128"]
    run("train_cls.py", args + ["--out-dir", str(ext)], env)
    assert json.loads((ext / "results.json").read_text())["n_test"] == 24
    trained, external = predictions(out), predictions(ext)
    assert len(external) == 24
    assert all(external[p] == pytest.approx(q, abs=1e-5) for p, q in trained.items())

    # Two gloo processes shard the test set without padding and gather every image once.
    ddp = tmp_path / "ddp"
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           str(ROOT / "train_cls.py"), *args, "--out-dir", str(ddp)],
                          env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads((ddp / "predictions_seed1.json").read_text())
    assert len(rows) == len({r["path"] for r in rows}) == 24
    assert all(external[r["path"]] == pytest.approx(r["prob"], abs=1e-5) for r in rows)


def test_zeroshot_official_prompts(tmp_path, env):
    out = tmp_path / "zs"
    proc = run("zeroshot.py", TINY + ["--out-dir", str(out), "--split", "all"], env)
    res = json.loads((out / "results.json").read_text())
    assert res["task"] == "zeroshot" and res["n_test"] == 24
    # the phantom stands in for BUSI: the official BREAST_PROMPTS_ENSEMBLE, ten per class
    assert res["prompts"]["malignant"][0] == "A malignant nodule with an irregular shape and " \
        "spiculated margins" and len(res["prompts"]["benign"]) == 10
    assert "warning" in res and "Acc" in proc.stdout
    assert len(res["confusion_matrix"]) == 2


def losses(out):
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    by_epoch = {r["epoch"]: r["loss"] for r in log if "loss" in r}  # a resumed epoch overwrites
    return [by_epoch[e] for e in sorted(by_epoch)]


def test_resume_after_kill_matches_uninterrupted_run(tmp_path, env):
    args = TRAIN + ["--epochs", "4", "--adapter", "mona"]
    run("train_seg.py", args + ["--out-dir", str(tmp_path / "a")], env)
    b = tmp_path / "b"
    proc = subprocess.Popen([sys.executable, str(ROOT / "train_seg.py"), *args, "--out-dir", str(b)],
                            env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if (b / "log.jsonl").exists() and len(losses(b)) >= 2:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.05)
    proc.wait()
    assert not (b / "results.json").exists(), "the run finished before it could be killed"
    logged_before = len((b / "log.jsonl").read_text().splitlines())
    resumed = run("train_seg.py", args + ["--out-dir", str(b), "--resume"], env).stdout
    start = int(resumed.split("resumed from")[1].split("at epoch")[1].split()[0])
    assert start >= 1  # it continued rather than starting again
    new = [json.loads(x) for x in (b / "log.jsonl").read_text().splitlines()[logged_before:]]
    assert [r["epoch"] for r in new if "loss" in r] == list(range(start + 1, 5))
    ra, rb = (json.loads((d / "results.json").read_text()) for d in (tmp_path / "a", b))
    assert losses(b) == pytest.approx(losses(tmp_path / "a"), rel=1e-6)
    assert rb["metrics"]["dice"]["mean"] == pytest.approx(ra["metrics"]["dice"]["mean"], abs=1e-6)
