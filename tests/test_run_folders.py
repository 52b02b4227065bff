"""Issue 25, run folders, as a user runs the scripts: a folder is written once. A run refused or
failed before its first batch leaves no folder (not even the timestamped default one), a finished
run is never overwritten or appended to, --resume goes on only from a last.pt, and Ctrl-C prints
one line: what was saved and the command that goes on.

Most runs are in-process (conftest's run_script); `status` turns their end into the exit status
config.report_errors gives a user. The refusal of a finished folder and Ctrl-C run as subprocesses.
"""
import glob
import json
import os
import shlex
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from clip_us import config
from clip_us.config import USER_ERRORS
from clip_us.runs import default_out_dir

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--arch", "tiny", "--weights", "none", "--image-size", "32", "--phantom-n", "24",
        "--phantom-size", "64", "--workers", "0"]
TRAIN = TINY + ["--seeds", "1", "--batch-size", "8", "--epochs", "1", "--reduce-dim", "16",
                "--n-figures", "1"]


def offline(*args, **kwargs):
    raise urllib.error.URLError("no network in tests")


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")  # the phantom, written once for the module


@pytest.fixture(autouse=True)
def workdir(tmp_path, monkeypatch, one_thread):
    """Each test in its own working folder (a default run folder would be runs/... there), never
    online; the hooks a script installs in this process are put back afterwards."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(urllib.request, "urlopen", offline)
    monkeypatch.setattr(sys, "excepthook", sys.excepthook)
    monkeypatch.setattr(config, "_interrupt_note", None)


def status(run_script, script, args, cache, **env) -> tuple[int, str]:
    """(exit status, error message) of `python SCRIPT ARGS` run in this process: a user error
    exits 2 with its message alone (config.report_errors), sys.exit keeps its code."""
    try:
        run_script(script, args, {"CLIP_US_CACHE": cache, **env})
    except SystemExit as e:
        return e.code or 0, ""
    except USER_ERRORS as e:
        return 2, str(e)
    return 0, ""


def files(folder: Path) -> dict:
    """Every file under `folder` with its bytes."""
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def default_sigint():
    """In the child: Ctrl-C as a terminal delivers it. A shell's background job inherits SIGINT
    ignored, and Python then installs no KeyboardInterrupt handler, so the test's SIGINT would
    be lost wherever the suite itself runs in the background."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def python(args, cache, cwd=ROOT, **kw):
    return subprocess.Popen([sys.executable, *map(str, args)], cwd=cwd, text=True,
                            preexec_fn=default_sigint, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, "CLIP_US_CACHE": str(cache),
                                 "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}, **kw)


# ----------------------------------------------------------------------------- folder names
def test_default_folder_names_are_plain():
    """Row names such as "CLIP (Mona, init: train_seg)" give folder names of [a-z0-9_-] only (no
    colon, space or slash, which some file systems or shells refuse), one rule for every script."""
    path = default_out_dir("train_seg", "busi", "CLIP (Mona, init: train_seg)")
    assert path.parent == Path("runs/train_seg")
    assert path.name.startswith("busi-clip-mona-init-train_seg-")
    assert all(c.isalnum() or c in "_-" for c in path.name)


# ----------------------------------------------------------------------------- finished, --resume
def test_a_finished_run_is_never_overwritten(run_script, cache, tmp_path, capsys):
    out = tmp_path / "seg"
    assert status(run_script, "train_seg.py", TRAIN + ["--out-dir", out], cache) == (0, "")
    before = files(out)
    assert {Path("results.json"), Path("log.jsonl"), Path("seed1/last.pt")} <= before.keys()

    again = python([ROOT / "train_seg.py", *TRAIN, "--out-dir", out], cache)
    stdout, stderr = again.communicate(timeout=300)
    assert again.returncode == 2 and "Traceback" not in stderr
    error = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(error) == 1 and "holds a finished run" in error[0]
    assert "new --out-dir" in error[0] and "--resume" in error[0]
    assert files(out) == before, "results.json, log.jsonl and the checkpoints are unchanged"

    capsys.readouterr()
    assert status(run_script, "train_seg.py", TRAIN + ["--out-dir", out, "--resume"], cache) == (0, "")
    assert "finished run (results.json): nothing to resume" in capsys.readouterr().out
    code, message = status(run_script, "zeroshot.py", TINY + ["--out-dir", out], cache)
    assert code == 2 and "finished run" in message and "--resume" not in message  # it has none
    assert files(out) == before


def test_resume_with_nothing_to_resume(run_script, cache, tmp_path):
    code, message = status(run_script, "train_seg.py", TRAIN + ["--out-dir", "new", "--resume"],
                           cache)
    assert code == 2 and "nothing to resume" in message and "drop --resume" in message
    assert not (tmp_path / "new").exists()
    (tmp_path / "empty").mkdir()
    code, message = status(run_script, "train_cls.py", TRAIN + ["--out-dir", "empty", "--resume"],
                           cache)
    assert code == 2 and "nothing to resume" in message
    assert not any((tmp_path / "empty").iterdir())


# ----------------------------------------------------------------------------- refused: no folder
def manifest(path: Path, header: str, missing: bool = False) -> Path:
    """A caption manifest of 24 noise images (and one that is not there, with `missing`)."""
    rows = []
    for i in range(24):
        Image.fromarray(np.random.default_rng(i).integers(0, 255, (32, 32), np.uint8)).save(f"{i}.png")
        rows.append(f"{i}.png,a breast ultrasound image of lesion number {i}")
    path.write_text("\n".join([header, *rows, *["gone.png,a breast image that is not there"] * missing]))
    return path


ERRORS = {  # name: (script, arguments, message, empty cache)
    "no weights cached": ("train_seg.py", ["--phantom-n", "24", "--phantom-size", "64",
                                           "--workers", "0"], "could not download", True),
    "no GPU": ("train_seg.py", TRAIN + ["--device", "cuda"], "no CUDA GPU", False),
    "no caption column": ("train_contrastive.py", TINY + ["--manifest", "nocaption.csv"],
                          "which column holds the caption", False),
    "missing image": ("train_contrastive.py", TINY + ["--manifest", "missing.csv"],
                      "'gone.png' not found", False),
    "no EchoCare weights": ("train_contrastive.py", ["--model", "echocare", *TINY[4:]],
                            "EchoCare encoder weights not found", True),
}


@pytest.mark.parametrize("case", ERRORS)
def test_user_errors_leave_no_run_folder(case, run_script, cache, tmp_path):
    script, args, said, empty = ERRORS[case]
    if case == "no GPU" and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    manifest(tmp_path / "nocaption.csv", "image,label")
    manifest(tmp_path / "missing.csv", "image,caption", missing=True)
    code, message = status(run_script, script, args, tmp_path / "empty" if empty else cache)
    assert code == 2 and said in message
    assert not (tmp_path / "runs").exists(), "no folder, not even the timestamped default"


def test_init_mismatch_leaves_no_run_folder(run_script, cache, tmp_path):
    assert status(run_script, "train_seg.py", TRAIN + ["--out-dir", "mona"], cache) == (0, "")
    code, message = status(run_script, "train_seg.py",
                           TRAIN + ["--adapter", "none", "--init", "mona/seed1/best.pt"], cache)
    assert code == 2 and "--init" in message
    assert not (tmp_path / "runs").exists()


# ----------------------------------------------------------------------------- Ctrl-C
def test_ctrl_c_says_what_was_saved_and_how_to_go_on(run_script, cache, tmp_path):
    """Ctrl-C part-way (a run in the default folder): one line naming the last.pt and the command
    that goes on, exit 130. Without --resume, or with another adapter, that folder is refused;
    the command finishes it."""
    args = TRAIN + ["--epochs", "8", "--eval-every", "8"]
    proc = python([ROOT / "train_seg.py", *args], cache, cwd=tmp_path)
    deadline = time.time() + 300
    while proc.poll() is None and time.time() < deadline \
            and not glob.glob("runs/train_seg/*/seed1/last.pt"):
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "Traceback" not in stderr, stderr[-2000:]
    [line] = [line for line in stderr.splitlines() if "interrupted" in line]
    folder = Path(glob.glob("runs/train_seg/*")[0])
    assert line.startswith(f"interrupted: saved {folder / 'seed1/last.pt'} (epoch ")
    command = shlex.split(line.split("to go on: ")[1])
    assert command[-3:] == ["--resume", "--out-dir", str(folder)]

    before = files(folder)
    code, message = status(run_script, "train_seg.py", args + ["--out-dir", folder], cache)
    assert code == 2 and "unfinished run (seed1/last.pt)" in message and "--resume" in message
    code, message = status(run_script, "train_seg.py", command[2:] + ["--adapter", "lora"], cache)
    assert code == 2 and "its adapter is mona, not lora" in message  # resumed only as what it is
    assert files(folder) == before
    assert status(run_script, "train_seg.py", command[2:], cache) == (0, "")
    log = [json.loads(line) for line in (folder / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log if "loss" in r] == list(range(1, 9))  # one run, each epoch once
    best = folder / "seed1/best.pt"   # saved after the resume: its config says resume
    assert status(run_script, "train_seg.py", ["--eval-only", "--checkpoint", best, "--workers", "0",
                                               "--out-dir", "test"], cache) == (0, "")
    assert (tmp_path / "test/results.json").is_file()
