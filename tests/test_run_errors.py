"""Issue 17, script side: messages that point at the real fault (disk full, a text file or a
checkpoint of the other task, --eval-only without --checkpoint), and a run that fails its data
checks leaves an existing run folder's config.json as it was."""
import dataclasses
import json
import os

import pytest
import torch

from clip_us import checkpoint
from clip_us.adapters import read_adapter
from clip_us.checkpoint import load_checkpoint, save_checkpoint
from clip_us.config import SupervisedConfig
from clip_us.data import DataError
from clip_us.runs import start_run, supervised_data


def test_disk_full_is_said_with_the_path(tmp_path, monkeypatch):
    def full(obj, f):   # what torch.save raises when the disk fills mid-write
        raise RuntimeError("[enforce fail at inline_container.cc:626] . unexpected pos 4160 vs 4054")
    monkeypatch.setattr(checkpoint.torch, "save", full)
    target = tmp_path / "seed1" / "best.pt"
    with pytest.raises(OSError, match=r"disk full: cannot write checkpoint .*seed1/best\.pt .* "
                                      r"free some space, or pass --out-dir"):
        save_checkpoint(target, {"x": torch.zeros(1)})
    assert os.listdir(tmp_path / "seed1") == [], "no temporary file left behind"

    def broken(obj, f):
        raise RuntimeError("something else")
    monkeypatch.setattr(checkpoint.torch, "save", broken)
    with pytest.raises(RuntimeError, match="something else"):   # other errors are not renamed
        save_checkpoint(target, {})


def test_text_or_empty_file_as_a_checkpoint(tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("lr 1e-4, seeds 1 2 3\n")
    with pytest.raises(ValueError, match=r"notes\.txt is not a checkpoint: it is a text file "
                                         r"\(it begins 'lr 1e-4") as e:
        read_adapter(text)                      # what --init does with the file
    assert "pytorch.org" not in str(e.value) and "http" not in str(e.value)
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match="the file is empty"):
        load_checkpoint(empty)
    good = tmp_path / "good.pt"
    torch.save({"a": torch.ones(2)}, good)
    assert torch.equal(load_checkpoint(good)["a"], torch.ones(2))


def tiny_cfg(tmp_path, **kw) -> SupervisedConfig:
    kw.setdefault("out_dir", str(tmp_path / "run"))
    kw.setdefault("phantom_n", 20)
    return SupervisedConfig(arch="tiny", weights="none", image_size=32, phantom_size=32,
                            device="cpu", workers=0, **kw)


def test_eval_only_without_checkpoint(tmp_path):
    with pytest.raises(ValueError, match=r"--eval-only needs --checkpoint PATH.*train_seg\.py"):
        start_run(tiny_cfg(tmp_path, eval_only=True), "train_seg")
    assert not (tmp_path / "run").exists()


def test_checkpoint_of_the_other_task(tmp_path):
    ckpt = tmp_path / "best.pt"
    torch.save({"config": dataclasses.asdict(tiny_cfg(tmp_path)), "seed": 1, "script": "train_cls"},
               ckpt)
    cfg = tiny_cfg(tmp_path, eval_only=True, checkpoint=str(ckpt))
    with pytest.raises(ValueError, match=r"trained by train_cls\.py for classification; "
                                         r"train_seg\.py --eval-only needs a segmentation checkpoint"):
        start_run(cfg, "train_seg")
    assert start_run(cfg, "train_cls").ckpt["script"] == "train_cls"


def test_failed_data_checks_keep_config_json(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.json").write_text('{"old": true}\n')
    bad = tiny_cfg(tmp_path, dataset="folder", data_root=str(tmp_path / "missing"))
    run = start_run(bad, "train_seg")
    with pytest.raises(DataError, match="data folder not found"):
        supervised_data(run, "seg")
    assert json.loads((out / "config.json").read_text()) == {"old": True}
    assert sorted(os.listdir(out)) == ["config.json"], "nothing else written either"
    fresh = tiny_cfg(tmp_path, out_dir=str(tmp_path / "new"), phantom_n=3)
    with pytest.raises(DataError, match="--phantom-n 3 is too few"):
        supervised_data(start_run(fresh, "train_seg"), "seg")
    assert not (tmp_path / "new").exists(), "a run refused before training leaves no folder"


@pytest.mark.parametrize("flag,value", [("--epochs", "0"), ("--batch-size", "0"),
                                        ("--image-size", "0"), ("--epochs", "-3")])
def test_bad_numeric_flags_refused_at_parse_time(flag, value, capsys):
    from clip_us.config import parse_config
    with pytest.raises(SystemExit) as e:
        parse_config(SupervisedConfig, [flag, value])
    assert e.value.code == 2
    assert f"argument {flag}: must be at least" in capsys.readouterr().err
    assert parse_config(SupervisedConfig, ["--epochs", "1", "--batch-size", "2"]).batch_size == 2
