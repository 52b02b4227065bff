"""The scripts' command lines: every option explained with its default, user errors as one message
and exit status 2, row names that tell LoRA's two settings apart, --eval-only's data settings."""
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from clip_us.adapters import adapter_trains
from clip_us.config import (
    ClsConfig,
    SupervisedConfig,
    ZeroShotConfig,
    eval_only_config,
    given_fields,
    missing_help,
    parse_config,
)
from clip_us.runs import row_name

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("cls", [SupervisedConfig, ClsConfig, ZeroShotConfig])
def test_every_option_has_help(cls):
    assert missing_help(cls) == []


def test_help_shows_defaults_and_examples_and_no_task_flag():
    proc = subprocess.run([sys.executable, str(ROOT / "train_seg.py"), "--help"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0
    assert "(default: 200)" in proc.stdout and "examples:" in proc.stdout
    assert "--task" not in proc.stdout and "--backbone {clip,metaclip," in proc.stdout


def test_lora_rows_differ_by_adapter_train():
    frozen = row_name("clip", "lora", False, adapter_trains("lora", "no"))
    trained = row_name("clip", "lora", False, adapter_trains("lora", "yes"))
    assert frozen == row_name("clip", "lora", False, adapter_trains("lora", "auto")) == "CLIP (LoRA)"
    assert trained == "CLIP (LoRA, trained)" != frozen
    assert row_name("clip", "mona", True, adapter_trains("mona", "auto")) == "CLIP (Mona, ft.)"
    assert row_name("clip", "mona", False, False) == "CLIP (Mona, frozen)"


@pytest.mark.parametrize("cls", [SupervisedConfig, ClsConfig, ZeroShotConfig])
def test_help_shows_each_default_once_and_no_empty_one(cls):
    """An empty default prints nothing ("(default: )" says nothing), and a help text that
    states its default gets no second one from argparse."""
    from clip_us.config import build_parser
    text = build_parser(cls).format_help()
    assert "(default: )" not in text and "(default: 32)" in text  # --batch-size's
    for entry in text.split("\n  --")[1:]:
        assert entry.count("(default") <= 1, entry


def test_official_defaults():
    cfg = SupervisedConfig()
    assert (cfg.grad_clip, cfg.decay, cfg.adapter_train) == (0.0, "all", "auto")
    assert ZeroShotConfig().split == "all"


def test_eval_only_keeps_the_checkpoints_phantom_unless_given():
    saved = SupervisedConfig(phantom_n=60, phantom_size=96, seeds=[2], arch="tiny")
    ckpt = {"config": dataclasses.asdict(saved), "seed": 2}
    argv = ["--eval-only", "--checkpoint", "x.pt"]
    cli = parse_config(SupervisedConfig, argv)
    cfg = eval_only_config(cli, ckpt, given_fields(SupervisedConfig, argv))
    assert (cfg.phantom_n, cfg.phantom_size, cfg.arch, cfg.seeds) == (60, 96, "tiny", [2])
    argv += ["--phantom-n", "30"]
    cfg = eval_only_config(parse_config(SupervisedConfig, argv), ckpt,
                           given_fields(SupervisedConfig, argv))
    assert (cfg.phantom_n, cfg.phantom_size) == (30, 96)


def test_eval_only_says_which_given_flags_the_checkpoint_overrides(capsys):
    saved = SupervisedConfig(arch="tiny", adapter="mona", seeds=[2])
    ckpt = {"config": dataclasses.asdict(saved), "seed": 2}
    argv = ["--eval-only", "--checkpoint", "x.pt", "--adapter", "lora", "--lr", "1e-4",
            "--no-amp", "--precision", "bf16"]
    cfg = eval_only_config(parse_config(SupervisedConfig, argv), ckpt,
                           given_fields(SupervisedConfig, argv))
    out = capsys.readouterr().out
    assert cfg.adapter == "mona" and cfg.amp and cfg.precision == "bf16"
    assert "--adapter lora is not used: --eval-only takes adapter from the checkpoint (mona)" in out
    assert "--no-amp is not used" in out
    assert "--lr" not in out and "--precision" not in out  # same value; taken from the CLI


def test_missing_data_root_is_one_message_exit_2_and_no_run_folder(tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, "CLIP_US_CACHE": str(tmp_path / "cache")}
    args = [sys.executable, str(ROOT / "train_seg.py"), "--dataset", "busi", "--arch", "tiny",
            "--weights", "none", "--out-dir", str(out)]
    proc = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and "--data-root" in proc.stderr
    assert proc.stderr.count("error:") == 1
    assert not out.exists()
    debug = subprocess.run(args + ["--debug"], cwd=ROOT, env=env, capture_output=True, text=True,
                           timeout=300)
    assert debug.returncode == 1 and "Traceback" in debug.stderr


def test_eval_only_keeps_an_init_that_the_checkpoint_does_not_hold(tmp_path, capsys):
    """--eval-only must rebuild the backbone a run trained on: a --init file (a fine-tuned tower
    from train_contrastive.py) stays when the task checkpoint has no model_state_dict."""
    from clip_us.config import init_for_eval
    init = tmp_path / "ft.pt"
    init.write_bytes(b"x")
    assert init_for_eval(str(init), {"adapter_state_dict": {}}) == str(init)
    assert init_for_eval(str(init), {"model_state_dict": {}}) == ""  # the checkpoint has it
    assert init_for_eval("", {}) == ""
    assert init_for_eval(str(tmp_path / "gone.pt"), {}) == ""
    assert "gone.pt" in capsys.readouterr().out
