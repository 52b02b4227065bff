"""train_contrastive.py end to end, as a user runs it: the tiny architecture with random weights on
the phantom's caption manifest. DDP (two gloo processes) against one process with the doubled
batch, the checkpoint through train_seg.py --init, and the flag combinations that are errors."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--arch", "tiny", "--weights", "none", "--image-size", "64", "--phantom-size", "128",
        "--workers", "0"]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    return {**os.environ, "CLIP_US_CACHE": str(cache), "PYTHONUNBUFFERED": "1",
            "OMP_NUM_THREADS": "1"}


def run(args, env, script="train_contrastive.py", torchrun=0, check=True):
    launch = [sys.executable] + (["-m", "torch.distributed.run", "--nproc_per_node", str(torchrun)]
                                 if torchrun else [])
    proc = subprocess.run(launch + [str(ROOT / script), *map(str, args)], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=900)
    if check and proc.returncode:
        raise AssertionError(f"{script} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def log(out):
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def test_two_gloo_ranks_equal_one_process_with_the_doubled_batch(tmp_path, env):
    # heads mode: no dropout anywhere, and the learnable temperature checks that its gradient
    # is not scaled by the world size along with the features'. 32 training pairs: 4 steps.
    args = TINY + ["--phantom-n", "40", "--split", "80,20", "--train", "heads", "--epochs", "2",
                   "--lr", "1e-3"]
    run(args + ["--batch-size", "8", "--out-dir", tmp_path / "one"], env)
    run(args + ["--batch-size", "4", "--out-dir", tmp_path / "two"], env, torchrun=2)
    one, two = log(tmp_path / "one"), log(tmp_path / "two")
    epochs = [[r["epoch"] for r in rows if "epoch" in r] for rows in (one, two)]
    assert epochs == [[1, 2], [1, 2]]
    for a, b in zip(one, two):
        for key in ("loss",):
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=1e-5)
        for part in ("val", "untrained"):
            if part in a:
                want = {k: pytest.approx(v, rel=1e-5, abs=1e-6) for k, v in a[part].items()}
                assert want == b[part]
    assert one[-1]["val"]["loss"] != one[0]["untrained"]["loss"]  # it did train
    ck1 = torch.load(tmp_path / "one" / "best.pt", weights_only=True)["model_state_dict"]
    ck2 = torch.load(tmp_path / "two" / "best.pt", weights_only=True)["model_state_dict"]
    for k in ("visual.proj", "text_projection", "logit_scale"):
        torch.testing.assert_close(ck2[k], ck1[k], rtol=1e-5, atol=1e-6)


def test_a_resumed_run_validates_the_untrained_model_once(tmp_path, env):
    """--resume goes on from last.pt: log.jsonl keeps the one `untrained` record of the run's
    start, and results.json reports that one."""
    args = TINY + ["--phantom-n", "24", "--split", "70,30", "--train", "heads", "--batch-size", "8",
                   "--out-dir", tmp_path]
    run(args + ["--epochs", "1"], env)
    (tmp_path / "results.json").unlink()  # as if stopped after its first epoch
    run(args + ["--epochs", "2", "--resume"], env)
    rows = log(tmp_path)
    assert [r["epoch"] for r in rows if "epoch" in r] == [1, 2]
    assert sum("untrained" in r for r in rows) == 1
    untrained = json.loads((tmp_path / "results.json").read_text())["untrained"]
    assert untrained == {k: rows[0]["untrained"].get(k) for k in untrained}


def test_adapter_checkpoint_loads_through_train_seg_init(tmp_path, env):
    ft = tmp_path / "ft"
    proc = run(TINY + ["--phantom-n", "24", "--epochs", "1", "--batch-size", "8", "--out-dir", ft],
               env)
    assert "untrained:" in proc.stdout and "trainable" in proc.stdout
    assert "best epoch 1" in proc.stdout
    res = json.loads((ft / "results.json").read_text())
    assert res["task"] == "contrastive" and res["row"] == "CLIP (Mona, ft.)"
    assert res["train"] == "adapter"
    assert set(res["metrics"]) >= {"loss", "dup_i2t_R@1", "strict_t2i_R@10", "paired", "cross", "gap"}
    assert res["temperature"] == pytest.approx(0.07) and res["parameters"]["trainable"] > 0
    for name in ("split.json", "loss.svg", "retrieval.svg", "config.json", "best.pt", "last.pt"):
        assert (ft / name).is_file(), name
    ck = torch.load(ft / "best.pt", weights_only=True)
    assert "model_state_dict" not in ck and ck["adapter_config"]["kind"] == "mona"
    assert ck["normalisation"]["clip_norm"] is True and ck["temperature"] == pytest.approx(0.07)

    # --adapter-train no keeps the Mona weights as --init gave them: the seg checkpoint must
    # hold exactly the contrastive checkpoint's adapter tensors.
    seg = tmp_path / "seg"
    run(TINY + ["--phantom-n", "24", "--epochs", "1", "--seeds", "1", "--batch-size", "8",
                "--adapter", "mona", "--adapter-train", "no", "--init", ft / "best.pt",
                "--reduce-dim", "32", "--eval-every", "1", "--out-dir", seg], env,
        script="train_seg.py")
    seg_ck = torch.load(seg / "seed1" / "best.pt", weights_only=True)["adapter_state_dict"]
    assert seg_ck.keys() == ck["adapter_state_dict"].keys()
    assert all(torch.equal(seg_ck[k], v) for k, v in ck["adapter_state_dict"].items())
    row = json.loads((seg / "results.json").read_text())["row"]
    assert row.startswith("CLIP (Mona") and row.endswith("ft.)")


@pytest.mark.parametrize("args,message", [
    (["--train", "heads", "--adapter", "lora"], "--adapter lora with --train heads"),
    (["--adapter", "none"], "--train adapter with --adapter none trains nothing"),
    (["--text-encoder", "bert"], "--text-encoder only apply to --model echocare"),
])
def test_bad_flags_exit_2_with_a_message(args, message, env, tmp_path):
    proc = run(TINY + args + ["--out-dir", tmp_path], env, check=False)
    assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr


def test_training_signal_on_the_phantom_captions(tmp_path, env):
    """A few epochs of contrastive training on the phantom's three-tier captions (tiny random
    CLIP, both towers training: a frozen random text tower groups captions by template, not by
    content, so only a trained one can be matched): duplicate-aware validation R@1 (both
    directions averaged) ends at least 0.1 above the untrained model's, the alignment gap at
    least 0.05 above. 32 px keeps the lesion and its shadow visible and the step cheap."""
    out = tmp_path / "signal"
    run(["--arch", "tiny", "--weights", "none", "--train", "full", "--lr", "3e-4",
         "--batch-size", "16", "--image-size", "32", "--phantom-n", "400", "--phantom-size", "128",
         "--split", "95,5", "--epochs", "12", "--patience", "100", "--workers", "0",
         "--out-dir", out], env)
    res = json.loads((out / "results.json").read_text())
    before = res["untrained"]
    after = {k: v["mean"] for k, v in res["metrics"].items()}  # the best epoch's (val loss)
    r1 = lambda m: (m["dup_i2t_R@1"] + m["dup_t2i_R@1"]) / 2  # noqa: E731
    assert res["n_val"] == 20 and res["best_epoch"] >= 2  # measured: epoch 10, R@1 +0.2, gap +0.2
    assert r1(after) >= r1(before) + 0.1, (before, after)
    assert after["gap"] >= before["gap"] + 0.05, (before, after)


def phantom_captions(root, seed, n=12):
    """A small phantom with its template-caption manifest (the phantom's own writer)."""
    from clip_us.captions import phantom_manifest
    from clip_us.phantom import ORGANS, PhantomConfig
    return phantom_manifest(root, PhantomConfig(n=n, size=64, seed=seed, organs=ORGANS,
                                                p_normal=0.17))


def test_two_manifests_are_merged_and_counted(tmp_path, env):
    """--manifest A --manifest B: both sets in one run, split as one (the official MedPix +
    PMC-CURD); results.json holds the merged counts and each manifest's, split.json each
    manifest. Both phantoms name their images alike: the keys stay apart."""
    from clip_us.captions.manifest import read_rows, write_rows
    a, b = phantom_captions(tmp_path / "a", 0), phantom_captions(tmp_path / "b", 1)
    columns, rows, _ = read_rows(b)
    rows[0]["caption"] = "Breast."  # 20 characters or fewer: dropped by the cleaning
    write_rows(b, columns, rows)
    out = tmp_path / "run"
    run(["--arch", "tiny", "--weights", "none", "--image-size", "32", "--epochs", "1",
         "--batch-size", "8", "--workers", "0", "--seed", "3", "--manifest", a, "--manifest", b,
         "--out-dir", out], env)
    res = json.loads((out / "results.json").read_text())
    assert (res["data"]["rows"], res["data"]["kept"]) == (24, 23)
    assert res["data"]["manifests"] == [{"path": str(a), "rows": 12, "n_kept": 12},
                                        {"path": str(b), "rows": 12, "n_kept": 11}]
    assert res["manifest"] == [str(a), str(b)] and res["dataset"] == f"{a.stem}+{b.stem}"
    split = json.loads((out / "split.json").read_text())
    assert split["manifests"] == res["data"]["manifests"]
    keys = split["train"] + split["val"]
    assert len(keys) == len(set(keys)) == 23 and (res["n_train"], res["n_val"]) == (20, 3)
    assert {k.split("/")[0] for k in keys} == {"a", "b"}
    assert keys != sorted(keys, key=lambda k: k.split("/")[0])  # shuffled as one set


def test_a_manifest_given_twice_is_refused(tmp_path, env):
    a = phantom_captions(tmp_path / "a", 0, n=4)
    proc = run(TINY + ["--manifest", a, "--manifest", a, "--out-dir", tmp_path / "run"], env,
               check=False)
    assert proc.returncode == 2 and "is given twice" in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "run").exists()
