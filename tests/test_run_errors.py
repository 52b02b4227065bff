"""Issue 17, script side: messages that point at the real fault (disk full, a text file or a
checkpoint of the other task, --eval-only without --checkpoint), and a run that fails its data
checks leaves an existing run folder's config.json as it was."""
import dataclasses
import json
import os

import pytest
import torch

from clip_us import fileio as checkpoint
from clip_us.adapters import read_adapter
from clip_us.config import SupervisedConfig
from clip_us.data import DataError
from clip_us.fileio import load_checkpoint, save_checkpoint
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


# --epochs 0 and --batch-size 0 are the supervised scripts' defaults: the row's official values
@pytest.mark.parametrize("flag,value", [("--epochs", "-1"), ("--batch-size", "-1"),
                                        ("--image-size", "0"), ("--epochs", "-3")])
def test_bad_numeric_flags_refused_at_parse_time(flag, value, capsys):
    from clip_us.config import parse_config
    with pytest.raises(SystemExit) as e:
        parse_config(SupervisedConfig, [flag, value])
    assert e.value.code == 2
    assert f"argument {flag}: must be at least" in capsys.readouterr().err
    assert parse_config(SupervisedConfig, ["--epochs", "1", "--batch-size", "2"]).batch_size == 2


def test_results_json_counts_every_drop_and_a_stale_split_stops_the_next_run(tmp_path):
    """End to end, as a user runs it: the data block of results.json holds the counts, the
    console says them, and a second run in the same folder on other data stops (exit 2) before
    it overwrites anything."""
    import subprocess
    import sys
    from pathlib import Path

    import numpy as np
    from PIL import Image
    from scipy import ndimage
    from test_data_integrity import lesion_set

    root = lesion_set(tmp_path / "data", n=26, size=48)
    rows = (root / "labels.csv").read_text().splitlines()
    rows[1:3] = [r.split(",")[0] + ",normal" for r in rows[1:3]]          # 2 normal images
    (root / "labels.csv").write_text("\n".join(rows) + "\n")
    soft = root / "masks" / "case05.png"                                    # 1 blurred mask
    Image.fromarray(ndimage.gaussian_filter(np.asarray(Image.open(soft)) * 1.0, 1.5)
                    .astype(np.uint8)).save(soft)
    Image.fromarray(np.zeros((48, 48), np.uint8)).save(root / "masks" / "case06.png")  # empty
    Image.open(root / "images" / "case07.png").convert("RGB").save(root / "images" / "case07.jpg")
    out = tmp_path / "run"
    args = ["--arch", "tiny", "--weights", "none", "--image-size", "32", "--workers", "0",
            "--seeds", "1", "--epochs", "1", "--eval-every", "1", "--batch-size", "8",
            "--reduce-dim", "16", "--n-figures", "1", "--dataset", "folder", "--skip-bad",
            "--out-dir", str(out)]
    root_dir = Path(__file__).resolve().parents[1]
    env = {**os.environ, "CLIP_US_CACHE": str(tmp_path / "cache")}

    def train_seg(data_root):
        return subprocess.run([sys.executable, str(root_dir / "train_seg.py"), *args,
                               "--data-root", str(data_root)], cwd=root_dir, env=env,
                              capture_output=True, text=True, timeout=600)
    proc = train_seg(root)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    data = json.loads((out / "results.json").read_text())["data"]
    assert data["images_found"] == 27 and data["images_used"] == 23
    assert data["left_out_normal"] == 2 and data["duplicates"] == 2 and data["skipped_bad"] == 0
    assert data["masks_repaired"] == 1 and data["mask_threshold"] == 0.5 and data["empty_masks"] == 1
    console = proc.stdout + proc.stderr
    for said in ("left out 2 normal", "2 duplicate", "1 mask(s) are not binary", "empty mask"):
        assert said in console, said
    config = (out / "config.json").read_text()
    other = lesion_set(tmp_path / "other", n=24, seed=5)
    proc = train_seg(other)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    # a finished folder is refused before its split.json is read (tests/test_run_folders.py)
    assert "holds a finished run" in proc.stderr and "new --out-dir" in proc.stderr
    assert (out / "config.json").read_text() == config, "the failed run left config.json alone"


def test_a_user_error_under_torchrun_keeps_its_one_line(tmp_path):
    """torch's process group wraps sys.excepthook to prefix stderr with the rank, buffering it
    until the hook returns; ours exits inside it, so the error line was lost under torchrun
    (a bad --phantom-n said nothing). setup_distributed keeps ours."""
    import subprocess
    import sys
    from pathlib import Path
    script = tmp_path / "fails.py"
    script.write_text("from clip_us.config import report_errors\n"
                      "from clip_us.loop import setup_distributed\n"
                      "report_errors(False)\nsetup_distributed('cpu')\n"
                      "raise ValueError('--phantom-n 16 is too few images')\n")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc-per-node", "2", str(script)], env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode != 0
    assert "error: --phantom-n 16 is too few images" in done.stdout + done.stderr
    assert "Traceback (most recent call last):\n  File \"" + str(script) not in done.stderr
