"""Issue 25, "a checkpoint is used only for what it is": every checkpoint records what it is
(`what`), and each consumer (--eval-only, --init, evaluate.py --checkpoint, load_adapter, the
--resume check) uses it as that or refuses it with one line, before any work.

The scripts run as a user types them, in this process (one torch import) with report_errors'
outcome reproduced: a user error is one `error:` line and status 2, anything else a traceback.
One refusal runs as a real subprocess. The checkpoints are made once per module."""
import io
import json
import os
import runpy
import subprocess
import sys
import traceback
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import pytest
import torch

from clip_us import load_adapter
from clip_us.adapters import (
    AdapterConfig,
    adapter_config_of,
    apply_adapter,
    check_identity,
    checkpoint_identity,
)
from clip_us.config import USER_ERRORS
from clip_us.fileio import load_checkpoint
from clip_us.model import build_model

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--arch", "tiny", "--weights", "none", "--image-size", "64", "--phantom-n", "24",
        "--phantom-size", "128", "--workers", "0", "--batch-size", "8"]
TRAIN = TINY + ["--epochs", "1"]
SUPERVISED = TRAIN + ["--seeds", "1", "--eval-every", "1", "--reduce-dim", "32"]
FEW = ["--bootstrap", "0", "--probe-fractions", "0.5", "--probe-seeds", "42", "--e2e-fractions",
       "0.5", "--e2e-seeds", "42", "--e2e-epochs", "1", "--workers", "0"]  # evaluate.py, briefly


def run(script, *args):
    """(exit status, stdout, stderr) of `python SCRIPT ARGS`: what report_errors makes of an
    uncaught user error (one line, status 2) and of a bug (a traceback, status 1)."""
    out, err, argv, hook = io.StringIO(), io.StringIO(), sys.argv, sys.excepthook
    sys.argv, status = [str(ROOT / script), *map(str, args)], 0
    try:
        with redirect_stdout(out), redirect_stderr(err):
            runpy.run_path(str(ROOT / script), run_name="__main__")
    except SystemExit as e:  # fail(): its line is printed already
        status = e.code if isinstance(e.code, int) else 1
    except USER_ERRORS as e:
        err.write(f"error: {e.args[0] if isinstance(e, KeyError) else e}\n")
        status = 2
    except Exception:
        err.write(traceback.format_exc())
        status = 1
    finally:
        sys.argv, sys.excepthook = argv, hook
    return status, out.getvalue(), err.getvalue()


def ok(script, *args) -> str:
    status, out, err = run(script, *args)
    assert status == 0, f"{script} failed:\n{out[-2000:]}\n{err[-2000:]}"
    return out


def refused(script, *args, out_dir=None) -> str:
    """The one error line of a refusal: status 2, no traceback, no run folder made."""
    status, _, err = run(script, *args, *(("--out-dir", out_dir) if out_dir else ()))
    assert status == 2 and "Traceback" not in err, err
    assert out_dir is None or not Path(out_dir).exists(), "a refused run left its folder"
    return next(line for line in err.splitlines() if line.startswith("error: "))


def results(folder) -> dict:
    return json.loads((Path(folder) / "results.json").read_text())


@pytest.fixture(scope="module")
def runs(tmp_path_factory, one_thread):
    """The checkpoints, made once: a contrastive Mona fine-tune (--train adapter), a --train
    full fine-tune, a train_seg run and a tiny EchoCare-CLIP run (random encoders)."""
    root = tmp_path_factory.mktemp("runs")
    old = os.environ.get("CLIP_US_CACHE")
    os.environ["CLIP_US_CACHE"] = str(root / "cache")
    # 60 captioned images: enough for evaluate.py's split, which takes this run's manifest
    ok("train_contrastive.py", *TRAIN, "--phantom-n", "60", "--adapter", "mona", "--out-dir",
       root / "ft")
    ok("train_contrastive.py", *TRAIN, "--train", "full", "--out-dir", root / "full")
    ok("train_seg.py", *SUPERVISED, "--adapter", "mona", "--out-dir", root / "seg")
    echo = ok("train_contrastive.py", "--model", "echocare", *TRAIN, "--image-size", "32",
              "--split", "70,15,15", "--out-dir", root / "echo")
    yield {"root": root, "ft": root / "ft" / "best.pt", "full": root / "full" / "best.pt",
           "seg": root / "seg" / "seed1" / "best.pt", "echo": root / "echo" / "best.pt",
           "echo_stdout": echo, "manifest": results(root / "ft")["manifest"]}
    if old is None:
        os.environ.pop("CLIP_US_CACHE")
    else:
        os.environ["CLIP_US_CACHE"] = old


def test_every_checkpoint_records_what_it_is_and_older_files_are_read_alike(runs):
    want = {"ft": ("train_contrastive", "contrastive", "clip", "mona", "adapter"),
            "full": ("train_contrastive", "contrastive", "clip", "none", "full"),
            "seg": ("train_seg", "seg", "clip", "mona", "adapter+head"),
            "echo": ("train_contrastive", "contrastive", "echocare", "none", "heads")}
    for name, (script, task, backbone, adapter, train) in want.items():
        ckpt = load_checkpoint(runs[name])
        assert ckpt["what"] == {"script": script, "task": task, "backbone": backbone,
                                "adapter": adapter, "train": train, "init": None}, name
        older = {k: v for k, v in ckpt.items() if k != "what"}  # written before the record
        assert checkpoint_identity(older) == ckpt["what"], name
    official = {k.replace(".mona2.", ".mona."): v for k, v in
                load_checkpoint(runs["ft"])["adapter_state_dict"].items()}
    assert checkpoint_identity(official)["script"] == "NextGen-UIA"


def test_eval_only_takes_only_its_tasks_checkpoint(runs, tmp_path):
    """Item 1: a contrastive checkpoint was scored as a segmentation model (exit 0)."""
    line = refused("train_seg.py", "--eval-only", "--checkpoint", runs["ft"],
                   out_dir=tmp_path / "eval")
    assert "train_contrastive.py checkpoint" in line and f"train_seg.py --init {runs['ft']}" in line
    line = refused("train_cls.py", "--eval-only", "--checkpoint", runs["seg"],
                   out_dir=tmp_path / "eval")
    assert "trained by train_seg.py for segmentation" in line
    line = refused("train_cls.py", "--eval-only", "--checkpoint", runs["echo"],
                   out_dir=tmp_path / "eval")
    assert f"evaluate.py --checkpoint {runs['echo']}" in line


def test_zeroshot_names_the_adapter_it_loaded(runs, tmp_path):
    """Item 2: --init <Mona fine-tune> without --adapter said vanilla and "adapter": "none"."""
    args = (*TINY, "--init", runs["ft"])
    ok("zeroshot.py", *args, "--out-dir", tmp_path / "plain")
    ok("zeroshot.py", *args, "--adapter", "mona", "--out-dir", tmp_path / "mona")
    res = results(tmp_path / "plain")
    assert res["row"] == "CLIP (Mona, ft.)" and res["adapter"] == "mona"
    assert res["init_from"]["script"] == "train_contrastive"
    same = [(tmp_path / f / "predictions.json").read_text() for f in ("plain", "mona")]
    assert same[0] == same[1]
    line = refused("zeroshot.py", *args, "--adapter", "none", out_dir=tmp_path / "none")
    assert "holds a Mona adapter but --adapter none was given" in line


def test_a_supervised_checkpoint_is_named_as_what_it_is(runs, tmp_path):
    """Item 3: evaluate.py took a train_seg checkpoint as "CLIP (Mona, ft.)", and so did
    train_cls.py --init. evaluate.py refuses it; --init names it."""
    line = refused("evaluate.py", "--manifest", runs["manifest"], "--checkpoint", runs["seg"],
                   *FEW, out_dir=tmp_path / "evaluate")
    assert f"train_seg.py --eval-only --checkpoint {runs['seg']}" in line
    ok("train_cls.py", *SUPERVISED, "--init", runs["seg"], "--out-dir", tmp_path / "cls")
    res = results(tmp_path / "cls")
    assert res["row"] == "CLIP (Mona, init: train_seg)" and res["adapter"] == "mona"
    assert res["init_from"]["script"] == "train_seg" and res["init_from"]["path"] == str(runs["seg"])
    assert load_checkpoint(tmp_path / "cls" / "seed1" / "best.pt")["what"]["init"]["task"] == "seg"


def test_an_adapter_mismatch_is_refused_before_training(runs, tmp_path):
    """Item 5: train_seg.py --adapter none --init <Mona> trained a whole run, then stopped with
    a backwards message, leaving seed1/best.pt behind. A real process: the exit status and the
    one line come from report_errors itself."""
    out = tmp_path / "seg"
    proc = subprocess.run([sys.executable, str(ROOT / "train_seg.py"), *SUPERVISED, "--adapter",
                           "none", "--init", str(runs["ft"]), "--out-dir", str(out)], cwd=ROOT,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert (f"--init {runs['ft']} holds a Mona adapter but --adapter none was given: drop "
            f"--adapter ({runs['ft']}'s adapter is used) or pass --adapter mona") in proc.stderr
    assert "epoch" not in proc.stdout and not out.exists()


def test_echocare_checkpoint_points_at_evaluate(runs, tmp_path):
    """Item 7: the run offered its best.pt "for --init", which --init then refused."""
    assert f"checkpoint (for evaluate.py --checkpoint; it has no CLIP adapter for --init): " \
           f"{runs['echo']}" in runs["echo_stdout"]
    line = refused("train_cls.py", *SUPERVISED, "--init", runs["echo"], out_dir=tmp_path / "cls")
    assert "EchoCare-CLIP dual-encoder checkpoint" in line
    assert f"evaluate.py --checkpoint {runs['echo']}" in line
    with pytest.raises(ValueError, match="evaluate.py --checkpoint"):
        load_adapter(build_model(config="tiny"), runs["echo"])
    line = refused("train_contrastive.py", "--model", "echocare", *TRAIN[:2], *TRAIN[4:],
                   out_dir=tmp_path / "echo")
    assert "--image-weights" in line and "echocare_encoder.pth" in line


def test_load_adapter_keeps_taking_fine_tunes_and_official_files(runs, tmp_path):
    """What keeps working, and an official LoRA file of other settings through --init."""
    ft, full = load_checkpoint(runs["ft"]), load_checkpoint(runs["full"])
    model = load_adapter(build_model(config="tiny"), runs["ft"])
    assert adapter_config_of(model).kind == "mona"
    assert all(torch.equal(model.state_dict()[k], v) for k, v in ft["adapter_state_dict"].items())
    model = load_adapter(build_model(config="tiny"), runs["full"])  # --train full: the tower
    assert torch.equal(model.visual.conv1.weight, full["model_state_dict"]["visual.conv1.weight"])
    official = {k.replace(".mona2.", ".mona."): v for k, v in ft["adapter_state_dict"].items()}
    torch.save(official, tmp_path / "best_model.pth")  # as the official fine-tuning writes it
    model = load_adapter(build_model(config="tiny"), tmp_path / "best_model.pth")
    assert all(torch.equal(model.state_dict()[k], v) for k, v in ft["adapter_state_dict"].items())
    lora = apply_adapter(build_model(config="tiny"), AdapterConfig(kind="lora", r=4))
    torch.save({"adapter_type": "lora", "lora_r": 4, "lora_alpha": 32, "lora_state_dict": {
        k.replace("lora_A_q", "q_proj.w_lora_A").replace("lora_B_q", "q_proj.w_lora_B"): v
        for k, v in lora.state_dict().items() if k.endswith(("lora_A_q", "lora_B_q"))}},
        tmp_path / "lora.pth")
    assert adapter_config_of(load_adapter(build_model(config="tiny"), tmp_path / "lora.pth")).r == 4
    # --init takes the file's settings (r=4, not --adapter lora's default 16) and its kind
    ok("zeroshot.py", *TINY, "--init", tmp_path / "lora.pth", "--no-clip-norm", "--out-dir",
       tmp_path / "zs")  # the official code fed [0, 1] pixels
    res = results(tmp_path / "zs")
    assert res["row"] == "CLIP (LoRA, ft.)" and res["adapter"] == "lora"
    assert res["init_from"]["script"] == "NextGen-UIA"


def test_the_resume_check_names_what_differs(runs):
    """What --resume asks of a last.pt (adapters.check_identity): the script that resumes it."""
    last = runs["seg"].with_name("last.pt")
    assert check_identity(last, script="train_seg", adapter="mona")["task"] == "seg"
    with pytest.raises(ValueError, match=r"its script is train_seg, not train_cls; its adapter is "
                                         r"mona, not lora\. run it again"):
        check_identity(last, "run it again", script="train_cls", adapter="lora")
