"""The command lines: every option explained with its default, each shared option declared once,
user errors as one message and exit status 2, row names that tell LoRA's two settings apart,
--eval-only's data settings."""
import contextlib
import dataclasses
import io
import os
import runpy
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from clip_us import contrastive, export, loop, tables
from clip_us.adapters import adapter_trains
from clip_us.captions import __main__ as captions
from clip_us.config import (
    AdapterOptions,
    ClsConfig,
    ContrastiveConfig,
    EvaluateConfig,
    ModelOptions,
    SupervisedConfig,
    TrainOptions,
    ZeroShotConfig,
    build_parser,
    eval_only_config,
    fail,
    given_fields,
    parse_config,
    undocumented_options,
)
from clip_us.phantom import __main__ as phantom_cli
from clip_us.reproduce import ReproduceConfig
from clip_us.runs import row_name

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = {"train_seg.py": SupervisedConfig, "train_cls.py": ClsConfig,
           "zeroshot.py": ZeroShotConfig, "train_contrastive.py": ContrastiveConfig,
           "evaluate.py": EvaluateConfig}
PARSERS = {**{name: lambda cls=cls: build_parser(cls) for name, cls in SCRIPTS.items()},
           "python -m clip_us.captions": captions.build_parser,
           "python -m clip_us.phantom": lambda: build_parser(phantom_cli.PhantomCommand),
           "python -m clip_us.tables": lambda: build_parser(tables.TablesCommand),
           "python -m clip_us.export": lambda: build_parser(export.ExportCommand),
           "python -m clip_us.reproduce": lambda: build_parser(ReproduceConfig)}


@pytest.mark.parametrize("cli", PARSERS)
def test_every_option_has_help_and_shows_its_default(cli):
    """Every option of every command line (captions' subcommands included) has a help text, and
    --help shows its default, or the help says what an empty default means ("'' = ...")."""
    assert undocumented_options(PARSERS[cli]()) == []


@pytest.mark.parametrize("script", SCRIPTS)
def test_each_script_parses_its_config(script, monkeypatch):
    """`python SCRIPT --help` (in this process: it stops before any work) lists its config's
    options, and nothing else."""
    monkeypatch.setattr(sys, "argv", [str(ROOT / script), "--help"])
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as e:
        runpy.run_path(str(ROOT / script), run_name="__main__")
    assert e.value.code == 0
    expected = [o for a in build_parser(SCRIPTS[script])._actions for o in a.option_strings]
    shown = {w.strip("[],") for w in out.getvalue().split() if w.startswith(("-", "[-"))}
    assert set(expected) <= shown and "(default: )" not in out.getvalue()


def test_shared_options_are_declared_once():
    """A script whose recipe differs keeps its default, with the group's help text; the
    --ascii-only help names the characters the official whitelist keeps."""
    helps = {name: {f.name: f.metadata["help"] for f in dataclasses.fields(cls)}
             for name, cls in SCRIPTS.items()}
    assert helps["train_seg.py"]["lr"] == helps["train_contrastive.py"]["lr"]
    assert helps["train_seg.py"]["workers"] == helps["evaluate.py"]["workers"]
    assert helps["evaluate.py"]["ascii_only"].startswith(helps["train_contrastive.py"]["ascii_only"])
    assert "± ° µ" in helps["evaluate.py"]["ascii_only"]
    assert (ContrastiveConfig().epochs, SupervisedConfig().epochs) == (1000, 0)  # 0: the row's
    assert helps["train_seg.py"]["epochs"].startswith(helps["train_contrastive.py"]["epochs"])
    assert ContrastiveConfig().grad_clip == 1.0 and ZeroShotConfig().adapter == "none"
    assert (EvaluateConfig().seed, ContrastiveConfig().seed) == (42, 1)
    model_helps = {f.name: f.metadata["help"] for f in dataclasses.fields(ModelOptions)}
    assert helps["evaluate.py"]["image_size"].startswith(model_helps["image_size"])
    assert issubclass(SupervisedConfig, (TrainOptions, AdapterOptions))
    text = build_parser(ContrastiveConfig).format_help()
    assert "training (AdamW, cosine schedule, early stopping):" in text


def test_contrastive_train_choices_are_the_modes_it_has():
    """config.py imports nothing of clip_us, so it names --train's choices itself."""
    train = next(f for f in dataclasses.fields(ContrastiveConfig) if f.name == "train")
    assert tuple(train.metadata["choices"]) == contrastive.TRAIN_MODES


def test_given_fields_and_subcommands():
    argv = ["--model", "echocare", "--no-augment", "--lr=0.1"]
    assert given_fields(ContrastiveConfig, argv) == {"model", "augment", "lr"}
    refine = captions.parse_command(captions.COMMANDS, [
        "refine", "m.csv", "--out", "o.csv", "--endpoint", "http://h/v1", "--model", "m",
        "--no-progress", "--extra-body", '{"a": 1}'], **captions.PARSER)
    assert isinstance(refine, captions.RefineCommand)
    assert (refine.progress, refine.extra_body, refine.temperature) == (False, {"a": 1}, None)
    assert captions.RefineCommand(manifest="m", out="o", endpoint="e", model="m").extra_body == {}


def test_fail_and_device_errors(capsys):
    with pytest.raises(SystemExit) as e:
        fail(KeyError("no such column"))
    assert e.value.code == 2 and capsys.readouterr().err == "error: no such column\n"
    assert loop.resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match="--device bogus: not a device"):
        loop.resolve_device("bogus")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA GPU; use --device cpu"):
            loop.setup_distributed("cuda")


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
    text = build_parser(cls).format_help()
    batch = text.split("--batch-size BATCH_SIZE")[-1].split("\n  --")[0]  # 32, or 0 = the row's
    assert "(default: )" not in text and "(default: " in batch
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
    saved = SupervisedConfig(arch="tiny", adapter="mona", seeds=[2], amp=True)
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
